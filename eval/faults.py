"""Fault-injection campaign: requests through a three-tier store while its tiers are broken on purpose.

One `CacheStore` (a small memory tier, a disk tier, a Redis tier on a real `redis-server` this script starts
on 127.0.0.1) serves requests of a toy Qwen2.5-VL (random weights; each request has its own two images and
text, so every stored K/V was computed in the request's own context). Each request's answer is checked
against plain `generate` of the same model: policy "full" always, policy "none" too (an exact repeat: every
reused K/V comes from the same context, so it must be exact). Between and during requests the campaign
injects faults, cycling through every kind in shuffled rounds:

- sigkill_writer: a forked process re-writing real entries to disk and Redis, SIGKILLed after 5–80 ms;
- truncate / bitflip / garbage: a stored disk file truncated, one byte flipped, replaced by junk (in place);
- swap: a valid entry file copied onto another entry's name (entries are bound to their key);
- vanish: the disk tier's directory removed, recreated one request later;
- disk_full: the disk tier's filesystem filled (a 300 KiB tmpfs when run as root, else RLIMIT_FSIZE, which
  makes the kernel refuse larger writes the same way) for 1–3 requests;
- read_only: the tmpfs remounted read-only (as root; else the directory chmod 0o555) for 1–3 requests;
- redis_kill: redis-server SIGKILLed mid-request, restarted (empty) 1–3 requests later;
- redis_corrupt: a chunk of a Redis entry overwritten or deleted;
- gc: `vlcache store gc` trimming the directory in a thread while a request runs;
- threads: two threads reading, re-writing and listing entries through the same store during a request.

It prints faults injected, requests, wrong answers and crashes (an exception out of `generate` or out of a
store call), and the store's error counts per tier:

    python eval/faults.py --faults 1000 [--seed 0] [--out eval/results/faults.md]

tests/test_faults.py runs `--faults 30` in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.store.codec import KEY_PATTERN
from vlcache_hf.store.disk import SUFFIX, DiskTier
from vlcache_hf.store.redis_tier import RedisTier
from vlcache_hf.store.tiers import MemoryTier
from vlcache_hf.tools import toy

KINDS = ("sigkill_writer", "truncate", "bitflip", "garbage", "swap", "vanish", "disk_full", "read_only",
         "redis_kill", "redis_corrupt", "gc", "threads")
REQUESTS = 6
MAX_NEW_TOKENS = 4
TMPFS_BYTES = 300 * 1024
DISK_BUDGET = 200 * 1024
MEMORY_BUDGET = 48 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on 127.0.0.1 that the campaign kills and restarts."""

    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is required: apt-get install -y redis-server")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)


class DiskArea:
    """Where the disk tier lives: a subdirectory of a tiny tmpfs (root), else of a temp directory."""

    def __init__(self, base: Path):
        self.mount = base / "tmpfs"
        self.mount.mkdir()
        self.tmpfs = os.geteuid() == 0 and self._run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                                                     str(self.mount))
        self.path = self.mount / "cache"
        self.path.mkdir()
        self.filler = self.mount / "filler"
        self.read_only = False
        self.full = False

    @staticmethod
    def _run(*args: str) -> bool:
        return subprocess.run(args, capture_output=True).returncode == 0

    def fill(self) -> None:
        """The filesystem full (tmpfs), or the process unable to grow files past 1 KiB (RLIMIT_FSIZE)."""
        if self.tmpfs:
            with contextlib.suppress(OSError), open(self.filler, "wb") as handle:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
        else:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        self.full = True

    def unfill(self) -> None:
        if self.tmpfs:
            self.filler.unlink(missing_ok=True)
        else:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        self.full = False

    def make_read_only(self) -> None:
        if self.tmpfs:
            self.read_only = self._run("mount", "-o", "remount,ro", str(self.mount))
        else:
            os.chmod(self.path, 0o555)
            self.read_only = True

    def make_writable(self) -> None:
        if self.tmpfs:
            self._run("mount", "-o", "remount,rw", str(self.mount))
        elif self.path.exists():
            os.chmod(self.path, 0o700)
        self.read_only = False

    def files(self) -> list[Path]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(p for p in self.path.iterdir()
                          if p.name.endswith(SUFFIX) and KEY_PATTERN.match(p.name[: -len(SUFFIX)]))
        return []

    def close(self) -> None:
        self.make_writable()
        self.unfill()
        if self.tmpfs:
            self._run("umount", "-l", str(self.mount))


@dataclass
class Tally:
    faults: Counter = field(default_factory=Counter)
    requests: int = 0
    requests_by_policy: Counter = field(default_factory=Counter)
    wrong: int = 0
    crashes: int = 0
    crash_examples: list[str] = field(default_factory=list)
    encoder_hits: int = 0
    kv_hits: int = 0

    def crash(self, where: str, err: BaseException) -> None:
        self.crashes += 1
        if len(self.crash_examples) < 10:
            self.crash_examples.append(f"{where}: {err!r}")


class Campaign:
    def __init__(self, seed: int, workdir: Path):
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.model, self.processor = toy.build_model(), toy.build_processor()
        self.requests = [
            toy.chat_inputs(self.processor, [toy.message(
                "user", f"Request {r}: compare", toy.make_image(100 + 2 * r), "with", toy.make_image(101 + 2 * r), "?")])
            for r in range(REQUESTS)
        ]
        self.plain = [self._generate(inputs, None) for inputs in self.requests]
        self.redis = RedisServer(workdir / "redis")
        self.disk = DiskArea(workdir)
        self.disk_tier = DiskTier(self.disk.path, DISK_BUDGET)
        self.redis_tier = RedisTier(self.redis.url, socket_timeout=1.0)
        self.store = CacheStore([MemoryTier(MEMORY_BUDGET, device="cpu"), self.disk_tier, self.redis_tier],
                                retry_after=0.05, max_retry_after=0.5)
        self.restore_after: dict[str, int] = {}  # fault kind -> requests until it is undone

    def _generate(self, inputs, cache) -> torch.Tensor:
        out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **with_cache(self.model, cache))
        return out if isinstance(out, torch.Tensor) else out.sequences

    # -- requests --------------------------------------------------------------------------------------------

    def request(self) -> None:
        index = self.rng.randrange(REQUESTS)
        policy = self.rng.choice(("full", "none"))
        self.tally.requests += 1
        self.tally.requests_by_policy[policy] += 1
        try:
            cache = VLCache(self.model, store=self.store, policy=policy)
            answer = self._generate(self.requests[index], cache)
        except Exception as err:
            self.tally.crash(f"generate[{policy}]", err)
            return
        self.tally.encoder_hits += cache.report.encoder_hits
        self.tally.kv_hits += cache.report.kv_hits
        if not torch.equal(answer, self.plain[index]):
            self.tally.wrong += 1

    def _tick(self) -> None:
        """Undo the armed faults whose window has passed (disk full, read-only, Redis down, vanished dir)."""
        for kind in list(self.restore_after):
            self.restore_after[kind] -= 1
            if self.restore_after[kind] > 0:
                continue
            if kind in ("disk_full", "vanish") and self.disk.read_only:
                self.restore_after[kind] = 1  # undone once the filesystem is writable again
                continue
            del self.restore_after[kind]
            if kind == "disk_full":
                self.disk.unfill()
            elif kind == "read_only":
                self.disk.make_writable()
            elif kind == "redis_kill":
                self.redis.start()
            elif kind == "vanish":
                self.disk.path.mkdir(exist_ok=True)

    # -- faults ----------------------------------------------------------------------------------------------

    def inject(self, kind: str) -> None:
        self.tally.faults[kind] += 1
        getattr(self, f"fault_{kind}")()

    def _some_file(self) -> Path | None:
        files = self.disk.files()
        return self.rng.choice(files) if files else None

    def _rewrite(self, file: Path, data: bytes) -> None:
        """In place (same inode), as a failing disk or a careless tool would."""
        with contextlib.suppress(OSError), open(file, "r+b") as handle:
            handle.seek(0)
            handle.write(data)
            handle.truncate()

    def fault_truncate(self) -> None:
        file = self._some_file()
        if file is not None:
            with contextlib.suppress(OSError):
                data = file.read_bytes()
                self._rewrite(file, data[: self.rng.randrange(max(1, len(data)))])
        self.request()

    def fault_bitflip(self) -> None:
        file = self._some_file()
        if file is not None:
            with contextlib.suppress(OSError):
                data = bytearray(file.read_bytes())
                if data:
                    data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
                    self._rewrite(file, bytes(data))
        self.request()

    def fault_garbage(self) -> None:
        file = self._some_file()
        if file is not None:
            self._rewrite(file, self.rng.randbytes(self.rng.randrange(1, 4096)))
        self.request()

    def fault_swap(self) -> None:
        files = self.disk.files()
        if len(files) >= 2:
            src, dst = self.rng.sample(files, 2)
            with contextlib.suppress(OSError):
                shutil.copyfile(src, dst)
        self.request()

    def fault_vanish(self) -> None:
        shutil.rmtree(self.disk.path, ignore_errors=True)
        self.restore_after["vanish"] = 1
        self.request()

    def fault_disk_full(self) -> None:
        if not self.disk.full:
            self.disk.fill()
            self.restore_after["disk_full"] = self.rng.randint(1, 3)
        self.request()

    def fault_read_only(self) -> None:
        if not self.disk.read_only:
            self.disk.make_read_only()
            self.restore_after["read_only"] = self.rng.randint(1, 3)
        self.request()

    def fault_redis_kill(self) -> None:
        if self.redis.alive:
            timer = threading.Timer(self.rng.uniform(0.0, 0.15), self.redis.kill)  # mid-request
            timer.start()
            self.request()
            timer.join()
            self.restore_after["redis_kill"] = self.rng.randint(1, 3)
        else:
            self.request()

    def fault_redis_corrupt(self) -> None:
        with contextlib.suppress(Exception):
            client = self.redis_tier.client
            chunks = [k for k in client.scan_iter(f"{self.redis_tier.prefix}*:*")]
            if chunks:
                chunk = self.rng.choice(chunks)
                if self.rng.random() < 0.5:
                    client.delete(chunk)
                else:
                    size = client.strlen(chunk)
                    client.setrange(chunk, self.rng.randrange(max(1, size)), bytes([self.rng.randrange(256)]))
        self.request()

    def fault_gc(self) -> None:
        from vlcache_hf.tools.store_cli import cmd_gc

        args = argparse.Namespace(path=str(self.disk.path), budget=str(self.rng.randrange(1, DISK_BUDGET)), temp_age=0.5)

        def gc() -> None:
            try:
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                    cmd_gc(args)
            except Exception as err:
                if self.disk.path.exists() and not self.disk.read_only:  # gc of a missing/ro dir is the operator's
                    self.tally.crash("gc", err)

        thread = threading.Thread(target=gc)
        thread.start()
        self.request()
        thread.join()

    def fault_threads(self) -> None:
        stop = threading.Event()
        keys = [p.name[: -len(SUFFIX)] for p in self.disk.files()]

        def hammer() -> None:
            rng = random.Random(self.rng.random())
            while not stop.is_set():
                try:
                    if keys:
                        key = rng.choice(keys)
                        entry = self.store.get(key)
                        if entry is not None:
                            self.store.put(key, entry)
                    self.store.stats()
                except Exception as err:
                    self.tally.crash("thread", err)
                    return

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for thread in threads:
            thread.start()
        self.request()
        stop.set()
        for thread in threads:
            thread.join()

    def fault_sigkill_writer(self) -> None:
        keys = [p.name[: -len(SUFFIX)] for p in self.disk.files()]
        entries = [(k, e) for k in keys[:4] if (e := self.store.get(k)) is not None]
        if entries and self.redis.alive:
            pid = os.fork()
            if pid == 0:  # the writer: rewrites real entries until killed
                try:
                    disk = DiskTier(self.disk.path, DISK_BUDGET)
                    redis = RedisTier(self.redis.url, socket_timeout=1.0)
                    while True:
                        for key, entry in entries:
                            disk.put(key, entry)
                            redis.put(key, entry)
                finally:
                    os._exit(0)
            time.sleep(self.rng.uniform(0.005, 0.08))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.request()

    # -- the run ---------------------------------------------------------------------------------------------

    def run(self, faults: int) -> Tally:
        order: list[str] = []
        while len(order) < faults:
            block = list(KINDS)
            self.rng.shuffle(block)
            order += block
        for kind in order[:faults]:
            try:
                self.inject(kind)
            except Exception as err:  # a bug of the campaign itself is reported as a crash too
                self.tally.crash(f"inject {kind}", err)
            self._tick()
            if self.rng.random() < 0.5:
                self.request()
                self._tick()
        return self.tally

    def close(self) -> None:
        self.disk.close()
        self.redis.kill()


def report(tally: Tally, campaign: Campaign, args: argparse.Namespace, seconds: float) -> str:
    stats = campaign.store.stats()
    lines = [
        f"faults injected: {sum(tally.faults.values())}",
        f"requests: {tally.requests} ({dict(tally.requests_by_policy)})",
        f"wrong answers: {tally.wrong}",
        f"crashes: {tally.crashes}",
        f"encoder hits: {tally.encoder_hits}, kv hits: {tally.kv_hits}",
        "faults by kind: " + ", ".join(f"{k} {tally.faults[k]}" for k in KINDS),
        "store errors per tier: " + ", ".join(f"{s.name.split(':')[0]} {s.errors}" for s in stats),
        f"disk on tmpfs: {campaign.disk.tmpfs}; seconds: {seconds:.0f}",
    ]
    if tally.crash_examples:
        lines.append("crash examples: " + "; ".join(tally.crash_examples))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the totals as Markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="vlcache-faults-") as workdir:
        campaign = Campaign(args.seed, Path(workdir))
        try:
            tally = campaign.run(args.faults)
            text = report(tally, campaign, args, time.time() - start)
        finally:
            campaign.close()
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# Store fault-injection campaign\n\n"
            f"`python eval/faults.py --faults {args.faults} --seed {args.seed}` — toy Qwen2.5-VL (random weights), "
            f"CPU, torch {torch.__version__}, {os.cpu_count()} cores. Every answer compared with plain `generate`.\n\n"
            "```\n" + text + "\n```\n"
        )
    return 0 if tally.wrong == 0 and tally.crashes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
