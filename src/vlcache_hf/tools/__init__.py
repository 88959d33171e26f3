"""The tooling — toy models, synthetic data, the embedded models' loader, demo, benchmark, bound, the
command line — never imported by the runtime.

`toy` (tiny models of every family), `synthetic` (the synthetic multi-image VQA task), `pretrained` (loads
the embedded trained models from `vlcache_hf/assets/`), `demo`, `bench` + `bound` (the TTFT benchmark and
its bound), `cli` + `store_cli` + `calibrate_cli` (the `vlcache` command). These modules import the
runtime, not the other way round: `import vlcache_hf` loads none of them (`tests/test_import_purity.py`)
and no runtime module imports them (`tests/test_import_graph.py`). The probe machinery (moved-image
requests, KL) is runtime, `vlcache_hf.probe`: the calibration pass measures with it.
"""
