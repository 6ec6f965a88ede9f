"""Benchmark what checking signatures adds to push -> running on a node.

Run from the checkout (``python benchmarks/bench_signing.py``); no server is
needed.  A node with ``require_signed`` makes exactly two calls more for a
code document than one without: :meth:`himbeere.signing.Policy.refusal`
when the document arrives (canonical JSON of the signed fields, one Ed25519
verification, the downgrade check) and :meth:`~himbeere.signing.Policy.ran`
when its program starts (``releases.json`` written and fsynced, only when
the release is new).  This times both, in this process, on signed documents
of three sizes of code (1 KB, 64 KB, 1 MB), and, in a fresh interpreter, the
one-time import of ``cryptography`` that the first check pays.

Figures in milliseconds (``time.perf_counter``), each with ``n``,
``median`` and ``p99``: ``check_ms`` per code size, ``record_ms`` (a new
release each time: the worst case), ``import_ms``.  Target: ``check_ms``
median < 2 ms for the 64 KB document.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from himbeere import schema, signing  # noqa: E402
from uploader import keys  # noqa: E402

SIZES = {"1kb": 1024, "64kb": 64 * 1024, "1mb": 1024 * 1024}
TARGET_MEDIAN_MS = 2.0


def figure(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"n": len(samples), "median": round(statistics.median(samples), 4),
            "p99": round(p99, 4), "max": round(ordered[-1], 4)}


def signed_doc(key: keys.SigningKey, size: int, release: int = 1) -> dict[str, Any]:
    line = "x = 1  # padding to make the code as big as a real program\n"
    code = "def main():\n    pass\n" + line * (size // len(line))
    doc = {"_id": schema.program_id(1234567, "bench"), "_rev": "3-abc", "type": 1234567,
           "name": "bench", "code": code, "modules": {"util": "def f():\n    return 1\n"},
           "release": release, "pushed_by": "bench", "pushed_at": schema.iso()}
    return keys.sign(doc, key)


def time_calls(call: Any, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def import_ms(rounds: int) -> list[float]:
    script = ("import time\nstart = time.perf_counter()\n"
              "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey\n"
              "import hashlib\nprint((time.perf_counter() - start) * 1000)\n")
    return [float(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                 text=True, check=True).stdout) for _ in range(rounds)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="himbeere-bench-signing-") as tmp:
        key = keys.load(keys.keygen(str(Path(tmp) / "bench.key"))["key"])
        state = Path(tmp) / "state"
        state.mkdir()
        policy = signing.policy(key.public_b64, True, state)
        assert policy is not None
        result: dict[str, Any] = {"check_ms": {}, "rounds": args.rounds}
        for name, size in SIZES.items():
            doc = signed_doc(key, size)
            assert policy.refusal(doc) is None  # valid, and warms the key cache
            check = functools.partial(policy.refusal, doc)
            result["check_ms"][name] = figure(time_calls(check, args.rounds))
            result["check_ms"][name]["doc_bytes"] = len(json.dumps(doc))
        docs = iter([signed_doc(key, 1024, release) for release in
                     range(2, args.record_rounds + 2)])
        result["record_ms"] = figure(time_calls(lambda: policy.ran(next(docs)),
                                                args.record_rounds))
        result["import_ms"] = figure(import_ms(args.import_rounds))
    median = result["check_ms"]["64kb"]["median"]
    result["target"] = {"check_ms_64kb_median_below": TARGET_MEDIAN_MS,
                        "met": median < TARGET_MEDIAN_MS}
    result["machine"] = {"python": platform.python_version(), "machine": platform.machine(),
                         "cpus": __import__("os").cpu_count(),
                         "load": list(__import__("os").getloadavg())}
    result["date"] = schema.iso()
    return result


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="checks per size (2000)")
    parser.add_argument("--record-rounds", type=int, default=200,
                        help="releases recorded (200)")
    parser.add_argument("--import-rounds", type=int, default=5,
                        help="fresh interpreters importing cryptography (5)")
    parser.add_argument("--json-out", metavar="FILE", help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
