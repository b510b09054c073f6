"""Peak memory of the data pipeline: loading, fitting the standardiser, and building batches.

Each case runs in a fresh subprocess and reports its peak resident set (``VmHWM`` of
/proc/self/status) and wall time. Cases:

* ``baseline``: import attnfuse (and torch) only;
* ``copy``: a whole standardised copy: load, ``make_split``, ``Standardizer.fit``,
  ``transform`` (a standardised copy), ``to_batch`` of every part (runs on any version of the
  code: ``--src`` points it at another checkout's ``src``);
* ``inplace``: the same with ``transform(data, inplace=True)`` (no standardised copy);
* ``lazy``: load, split, fit, then one pass of ``iter_batches`` over ``RowBatches(data, rows,
  standardizer)`` for every part: only B rows at a time are gathered and standardised.

Data (10 classes): ``npz``: N=20,000 sequences, T=200, D=32 (512 MB of float32 in an uncompressed
.npz); ``dir``: a directory dataset of N=200,000, T=50, D=64 (2.56 GB of float32), memory-mapped;
``npz-big`` (not run by default): the same N=200,000 data as an .npz, loaded into memory.

    python benchmarks/memory.py --workdir /tmp/attnfuse-mem [--src OTHER/src --cases copy]

The data files are written on the first run and kept (``--clean`` deletes them at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

# name -> (format, (N, T, D))
DATA = {"npz": ("npz", (20_000, 200, 32)), "dir": ("dir", (200_000, 50, 64)), "npz-big": ("npz", (200_000, 50, 64))}
CHUNK_ROWS = 2_000

CASE_CODE = {
    "baseline": "import attnfuse.data",
    "copy": """
parts = dict(make_split(data, 0))
st = Standardizer.fit(data, parts["train"])
scaled = st.transform(data)
batches = {k: scaled.to_batch(v) for k, v in parts.items()}
""",
    "inplace": """
parts = dict(make_split(data, 0))
st = Standardizer.fit(data, parts["train"])
st.transform(data, inplace=True)
batches = {k: data.to_batch(v) for k, v in parts.items()}
""",
    "lazy": """
from attnfuse.data import RowBatches, iter_batches
parts = dict(make_split(data, 0))
st = Standardizer.fit(data, parts["train"])
for rows in parts.values():
    for batch in iter_batches(RowBatches(data, rows, st), 256, shuffle=True):
        pass
""",
}

RUNNER = """
import json, resource, sys, time
t0 = time.perf_counter()
import attnfuse
from attnfuse.data import Standardizer, load_data, make_split
if {load!r}:
    data = load_data({path!r})
{code}
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda key: int(status[key].split()[0])
print(json.dumps({{"peak_mib": kib("VmHWM") / 1024, "rss_mib": kib("VmRSS") / 1024,
                  "seconds": time.perf_counter() - t0, "attnfuse": attnfuse.__file__}}))
"""


def _rows(n: int, t: int, d: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the benchmark features, the same for every chunking."""
    rng = np.random.default_rng(start)
    return rng.standard_normal((stop - start, t, d), dtype=np.float32) * 2.0 + 1.0


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def write_npz(path: Path, n: int, t: int, d: int) -> None:
    """An uncompressed .npz written a chunk at a time (the benchmark's parent stays small too)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x_seq.npy", "w", force_zip64=True) as f:
            f.write(_header((n, t, d), np.float32))
            for start in range(0, n, CHUNK_ROWS):
                f.write(_rows(n, t, d, start, min(n, start + CHUNK_ROWS)).tobytes())
        with zf.open("y.npy", "w") as f:
            f.write(_header((n,), np.int64))
            f.write((np.arange(n) % 10).astype(np.int64).tobytes())


def write_dir(path: Path, n: int, t: int, d: int) -> None:
    path.mkdir(parents=True)
    with (path / "x_seq.npy").open("wb") as f:
        f.write(_header((n, t, d), np.float32))
        for start in range(0, n, CHUNK_ROWS):
            f.write(_rows(n, t, d, start, min(n, start + CHUNK_ROWS)).tobytes())
    np.save(path / "y.npy", (np.arange(n) % 10).astype(np.int64))


def run_case(case: str, path: Path | None, src: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if src:
        env["PYTHONPATH"] = src
    code = RUNNER.format(load=path is not None, path=str(path), code=CASE_CODE[case])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/attnfuse-memory"))
    ap.add_argument("--data", nargs="+", default=["npz", "dir"], choices=list(DATA))
    ap.add_argument("--cases", nargs="+", default=["baseline", "copy", "inplace", "lazy"], choices=list(CASE_CODE))
    ap.add_argument("--src", help="run against another checkout's src/ (e.g. the code before a change)")
    ap.add_argument("--clean", action="store_true", help="delete the data files at the end")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    rows = []
    for kind in args.data:
        fmt, (n, t, d) = DATA[kind]
        path = args.workdir / (f"bench_{n}.npz" if fmt == "npz" else f"bench_{n}")
        if not path.exists():
            t0 = time.perf_counter()
            (write_npz if fmt == "npz" else write_dir)(path, n, t, d)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        feature_mib = n * t * d * 4 / 2**20
        for case in args.cases:
            if kind != "npz" and case in ("copy", "inplace"):
                continue  # N=200,000: these make copies of 2.4 GiB; the point of a directory is not to
            result = run_case(case, None if case == "baseline" else path, args.src)
            rows.append({"data": kind, "N": n, "T": t, "D": d, "features_mib": feature_mib, "case": case, **result})
            print(json.dumps(rows[-1]), flush=True)
    if args.clean:
        shutil.rmtree(args.workdir)

    print("\n| data | case | features (MiB) | peak RSS (MiB) | peak / features | time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['data']} | {r['case']} | {r['features_mib']:.0f} | error: {r['error']} | | |")
            continue
        ratio = r["peak_mib"] / r["features_mib"]
        print(
            f"| {r['data']} N={r['N']:,} T={r['T']} D={r['D']} | {r['case']} | {r['features_mib']:.0f} "
            f"| {r['peak_mib']:.0f} | {ratio:.2f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
