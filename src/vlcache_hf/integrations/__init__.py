"""Integrations of vlcache-hf with evaluation frameworks (`vlcache_hf.integrations.lmms_eval`)."""
