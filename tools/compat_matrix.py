"""Run the test suite against older releases of torch, numpy, scipy, scikit-learn
and joblib, each combination in a throwaway virtual environment.

This is how the minimum versions in ``pyproject.toml`` and the tested matrix in
``docs/install.rst`` were found; it is not part of the default CI run (which
installs one CPU torch wheel, see ``.ci/run``). Usage, from the repository root::

    python tools/compat_matrix.py                  # the recorded matrix (below)
    python tools/compat_matrix.py --list           # print it and stop
    python tools/compat_matrix.py "torch==2.4.1 numpy==1.26.4 scipy==1.11.4"
    python tools/compat_matrix.py --ignore-floors "python==3.10 torch==1.13.1"

Each argument is one environment: a space- or comma-separated list of
requirements (``name==version``) installed first, together, into a new virtual
environment. A ``python==X.Y`` entry picks the interpreter: ``pythonX.Y`` on
the PATH, or the one given by ``--interpreter X.Y=/path/to/python``; without
one, the environment uses ``--python`` (default: the Python running this
script). An environment whose interpreter is missing is reported and skipped.
The package and its ``tests`` extra are then installed with those pins as
constraints, so an install that would have to replace a pinned release
(a floor in ``pyproject.toml`` above it) fails and is reported as such;
``--ignore-floors`` drops the lower bounds of the pinned packages in the copy
that is installed, to try releases below the current floors. Packages not
pinned (pytest, hypothesis, dask, ...) get the newest release that fits.

The working tree's tracked files are copied to a scratch folder first, so the
run tests the code as it is when the script starts, whatever is edited during
the run. Each environment is deleted after its run unless ``--keep`` is given.
The tests run with ``OMP_NUM_THREADS=1`` under ``nice``; one environment at a
time. Expect 5-10 minutes per environment on 2 cores, and a few GB of disk and
downloads each: the Linux x86_64 torch wheels on PyPI are CUDA builds that pull
the ``nvidia-*`` packages (they run on a CPU as well).

The summary (one line per environment: versions, pytest's counts, and the
result) is printed at the end and written to ``summary.txt`` in the scratch
folder, with each environment's full pip and pytest output beside it. The exit
code is 0 only if every environment passed.
"""
import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The recorded matrix: what docs/install.rst reports. The first line is the
#: floors (the oldest release of each that the suite passed with).
MATRIX = [
    "python==3.10 torch==2.0.1 numpy==1.21.6 scipy==1.8.1 scikit-learn==1.6.1 joblib==1.2.0 pandas==2.0.3",
    "python==3.10 torch==2.0.1 numpy==1.22.4 scipy==1.8.1 scikit-learn==1.6.1 joblib==1.2.0 pandas==2.0.3",
    "python==3.11 torch==2.0.0 numpy==1.23.5 scipy==1.9.3 scikit-learn==1.6.1 joblib==1.2.0 pandas==2.0.3",
    "python==3.11 torch==2.0.1 numpy==1.26.4 scipy==1.11.4 scikit-learn==1.6.1 joblib==1.3.2 pandas==2.1.4",
    "python==3.11 torch==2.1.2 numpy==1.23.5 scipy==1.9.3 scikit-learn==1.6.1 joblib==1.2.0 pandas==2.0.3",
    "python==3.11 torch==2.1.2 numpy==1.26.4 scipy==1.11.4 scikit-learn==1.6.1 joblib==1.3.2 pandas==2.1.4",
    "python==3.11 torch==2.4.1 numpy==1.26.4 scipy==1.13.1 scikit-learn==1.6.1 joblib==1.4.2",
    "python==3.11 torch==2.6.0 numpy==2.1.3 scipy==1.15.2 scikit-learn==1.6.1",
    "python==3.11 torch==2.9.1 numpy==2.3.5 scipy==1.16.3 scikit-learn==1.7.2",
    "python==3.11 torch==2.11.0",
    "python==3.11 torch==2.13.0",
    "python==3.11 torch==2.14.1",
]

#: The packages whose versions the summary reports.
REPORTED = ["python", "torch", "numpy", "scipy", "scikit-learn", "joblib", "pandas"]


def parse_spec(spec):
    reqs = [r for r in re.split(r"[\s,]+", spec.strip()) if r]
    for r in reqs:
        if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+(==|>=|<=|~=|<|>)[A-Za-z0-9_.+*]+", r):
            raise SystemExit(f"not a pinned requirement: {r!r} (write name==version)")
    return reqs


def req_name(req):
    return re.split(r"[=<>~\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def copy_tree(src, dest):
    """Copy the tracked files of the working tree at ``src`` (as they are now)."""
    files = subprocess.run(["git", "-C", str(src), "ls-files", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        p = src / rel
        if p.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / rel)


def drop_floors(pyproject, names):
    """Remove the lower bounds of ``names`` from the dependencies in ``pyproject``."""
    text = pyproject.read_text()
    text = re.sub(r'"(([A-Za-z0-9_.\-]+)(\[[^\]]*\])?)>=[^",]*"',
                  lambda m: f'"{m.group(1)}"' if req_name(m.group(2)) in names else m.group(0),
                  text)
    pyproject.write_text(text)


def run(cmd, log, **kw):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode


def versions(py):
    code = ("import importlib.metadata as m, platform\n"
            "print('python', platform.python_version())\n"
            f"for n in {REPORTED[1:]!r}:\n"
            "    try: print(n, m.version(n))\n"
            "    except m.PackageNotFoundError: print(n, '-')\n")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)


def pytest_counts(log):
    """pytest's closing line, e.g. '312 passed, 2 skipped in 301.2s'."""
    lines = Path(log).read_text().splitlines()
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error)", line) and " in " in line:
            return line.strip("= ").strip()
    return "no pytest summary"


def interpreter(reqs, args):
    """The interpreter for an environment: its ``python==X.Y`` entry, or --python."""
    wanted = [r.split("==", 1)[1] for r in reqs if req_name(r) == "python"]
    if not wanted:
        return args.python
    version = wanted[0]
    path = dict(args.interpreter).get(version) or shutil.which(f"python{version}")
    if path and subprocess.run([path, "-c", f"import sys; assert '%d.%d' % sys.version_info[:2] "
                                f"== {version!r}"], capture_output=True).returncode == 0:
        return path
    return None


def one_environment(i, reqs, args, src, scratch):
    tag = f"env{i:02d}"
    log = scratch / f"{tag}.log"
    env_dir = scratch / tag
    py = str(env_dir / "bin" / "python")
    print(f"[{tag}] {' '.join(reqs)}", flush=True)
    base = interpreter(reqs, args)
    reqs = [r for r in reqs if req_name(r) != "python"]
    if base is None:
        line = f"{' '.join(reqs)}  -> SKIPPED: no such Python (pass --interpreter X.Y=PATH)"
        print(f"[{tag}] {line}", flush=True)
        return line
    subprocess.run([base, "-m", "venv", str(env_dir)], check=True)
    pins = scratch / f"{tag}-pins.txt"
    pins.write_text("\n".join(reqs) + "\n")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    result = None
    if run(pip + reqs, log):
        result = "pinned stack did not install"
    elif run(pip + [f"{src}[tests]", "-c", str(pins)], log):
        result = ("skmapa did not install beside the pinned stack "
                  "(a floor in pyproject.toml excludes it?)")
    found = versions(py)
    if result is None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        rc = run(["nice", "-n", str(args.nice), py, "-m", "pytest", "-q", *args.pytest_args],
                 log, cwd=src, env=env)
        result = f"{'PASSED' if rc == 0 else 'FAILED'}: {pytest_counts(log)}"
    if not args.keep:
        shutil.rmtree(env_dir, ignore_errors=True)
    line = "  ".join(f"{n} {found.get(n, '-')}" for n in REPORTED) + f"  -> {result}"
    print(f"[{tag}] {line}\n[{tag}] log: {log}", flush=True)
    return line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="*",
                   help="one environment: requirements like 'torch==2.4.1 numpy==1.26.4' "
                        "(default: the recorded matrix)")
    p.add_argument("--list", action="store_true", help="print the recorded matrix and stop")
    p.add_argument("--ignore-floors", action="store_true",
                   help="drop the lower bounds of the pinned packages in the copy installed")
    p.add_argument("--keep", action="store_true", help="keep each virtual environment")
    p.add_argument("--scratch", type=Path,
                   help="scratch folder (default: a new temporary folder)")
    p.add_argument("--source", type=Path, default=ROOT,
                   help="the working tree to test (default: this repository)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter for environments without a python==X.Y entry "
                        "(default: this one)")
    p.add_argument("--interpreter", action="append", default=[], metavar="X.Y=PATH",
                   type=lambda v: tuple(v.split("=", 1)),
                   help="the interpreter for python==X.Y entries (default: pythonX.Y on the PATH)")
    p.add_argument("--nice", type=int, default=19, help="nice level of the test runs")
    p.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[],
                   help="passed on to pytest (put last)")
    args = p.parse_args(argv)
    specs = args.spec or MATRIX
    if args.list:
        print("\n".join(specs))
        return 0
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="skmapa-compat-"))
    scratch = scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    src = scratch / "src"
    if src.exists():
        shutil.rmtree(src)
    copy_tree(args.source.resolve(), src)
    print(f"scratch folder: {scratch}", flush=True)
    lines = []
    for i, spec in enumerate(specs):
        reqs = parse_spec(spec)
        if args.ignore_floors:
            drop_floors(src / "pyproject.toml", {req_name(r) for r in reqs})
        lines.append(one_environment(i, reqs, args, src, scratch))
    head = f"{datetime.date.today().isoformat()}, {platform.system()} {platform.machine()}"
    summary = "\n".join([head, *lines]) + "\n"
    (scratch / "summary.txt").write_text(summary)
    print("\n" + summary, end="")
    return 0 if all("-> PASSED" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
