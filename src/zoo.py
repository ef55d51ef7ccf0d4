"""The released checkpoints by name, and the one resolver of every ``--pretrained``/``--teacher``/``--resume``.

    python -m src.zoo list                 # the table (``--markdown``: the README's rows)
    python -m src.zoo download lorac_r50_e200 https://host/ckpt.pth.tar   # fetch into the cache, print the paths

:func:`resolve` turns a checkpoint argument into a local file: an existing path is returned as given; an
``http(s)://`` URL or a zoo name (``lorac_r50_e200``) is downloaded once into the cache
(:func:`src.download.cache_dir`: ``$SSL_CACHE``, default ``~/.cache/ssl_zoo``) by
:func:`src.download.fetch` (lock, resumable ``.part``, hash check, atomic move) and the cached file is
returned. :func:`src.checkpoint.load_checkpoint` and :func:`src.models.teacher.load_teacher` call it, so
everything that opens a checkpoint takes all three; the entry scripts call :func:`resolve_arg` before
they start any process (one download per node, the other processes wait on the lock).

Hosts that need a browser (Google Drive, SharePoint) cannot be fetched: their zoo names and URLs stop
with one line saying where to download the file by hand and how to load it (by path, or by name once
saved as ``<cache>/<name>.pth.tar``).

The table (:data:`ZOO`) lists every checkpoint that the five seed READMEs and the MoCo / SwAV READMEs
link. ``layout`` is the key prefix :func:`src.checkpoint.load_backbone` finds in the file
(``src/checkpoint.py`` ``PREFIXES``) and ``container`` where the state dict sits. ``top1`` is the
ImageNet linear top-1 the README reports for that checkpoint (None: not reported). No README publishes
a SHA-256, so ``sha256`` is None everywhere; the MoCo README's md5 prefixes are checked.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import sys
from dataclasses import dataclass

from .download import cache_dir, fetch
from .errors import UserError, cli_main

BROWSER_HOSTS = ("drive.google.com", "docs.google.com", "sharepoint.com", "onedrive.live.com", "1drv.ms")
FB = "https://dl.fbaipublicfiles.com"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    method: str
    arch: str                 # ``-a`` of the evaluation scripts
    epochs: int
    top1: float | None        # ImageNet linear top-1 reported for this checkpoint (None: not reported)
    protocol: str             # ``eval_linear.py --protocol``
    url: str
    host: str
    source: str               # the README that links it
    layout: str               # key prefix load_backbone detects (src/checkpoint.py PREFIXES)
    container: str = "state_dict"   # "state_dict": under ckpt["state_dict"]; "top level": a raw state dict
    sha256: str | None = None
    md5: str | None = None    # md5 prefix as published
    browser: bool = False     # the host needs a browser: fetch by hand
    filename: str = ""        # the file name the host gives it
    note: str = ""


def _moco(name, method, epochs, top1, sub, md5):
    return ZooEntry(name, method, "resnet50", epochs, top1, "moco",
                    f"{FB}/moco/moco_checkpoints/{sub}/{sub}_pretrain.pth.tar", "dl.fbaipublicfiles.com",
                    "MoCo README", "module.encoder_q.", md5=md5, filename=f"{sub}_pretrain.pth.tar")


def _lorac(name, method):
    return ZooEntry(name, method, "resnet50", 200, None, "lorac",
                    f"https://github.com/ssl-codelab/lorac/releases/download/v1.0.0/{name}_pretrained.pth.tar",
                    "GitHub release", "LORAC README", "module.encoder_q.", filename=f"{name}_pretrained.pth.tar",
                    note="the README states no accuracy; key layout of the asset unverified (LORAC's training "
                         "script writes module.encoder_q.*), any known layout is detected")


def _caco(name, epochs, top1, url, note):
    return ZooEntry(name, "CaCo", "resnet50", epochs, top1, "caco", url, "SharePoint (browser)", "CaCo README",
                    "module.encoder_q.", browser=True, note=note)


def _pcl(v, top1):
    f = f"PCL_{v}_epoch200.pth.tar"
    return ZooEntry(f"pcl_{v}_r50_e200", f"PCL {v}", "resnet50", 200, top1, "pcl",
                    f"https://storage.googleapis.com/sfr-pcl-data-research/PCL_checkpoint/{f}",
                    "Google Cloud Storage", "PCL README", "module.encoder_q.", filename=f)


def _swav(name, method, epochs, top1, f, arch="resnet50", note=""):
    return ZooEntry(name, method, arch, epochs, top1, "swav", f"{FB}/deepcluster/{f}", "dl.fbaipublicfiles.com",
                    "SwAV README", "module.", container="top level", filename=f, note=note)


_SP = "https://purdue0-my.sharepoint.com/:u:/g/personal/wang3702_purdue_edu/"
_ENTRIES = [
    _moco("moco_v1_r50_e200", "MoCo v1", 200, 60.6, "moco_v1_200ep", "b251726a"),
    _moco("moco_v2_r50_e200", "MoCo v2", 200, 67.7, "moco_v2_200ep", "59fd9945"),
    _moco("moco_v2_r50_e800", "MoCo v2", 800, 71.1, "moco_v2_800ep", "a04e12f8"),
    _lorac("mocom_r50_e200", "MoCo-M"),
    _lorac("lorac_r50_e200", "LORAC"),
    ZooEntry("sogclr_r50_e800", "SogCLR", "resnet50", 800, 69.0, "sogclr",
             "https://drive.google.com/file/d/1baWWT6Xf9ylLHimWXZuhvdiKUkkMLB0_/view?usp=sharing",
             "Google Drive (browser)", "SogCLR README", "module.base_encoder.", browser=True,
             filename="checkpoint_0799.pth.tar", note="ImageNet-1K, batch 256 (PyTorch version)"),
    _caco("caco_r50_e200_b1024", 200, 71.3, _SP + "EcqhVUwoVOVJvxShvDXwF9oBs1xqrXe0_Y23NZ7guiGMlQ?e=FzmRzG",
          "single crop, batch 1024"),
    _caco("caco_r50_e200_b4096", 200, 72.0, _SP + "ETuGL8BXTz9PqZ23NGfyDJIBBQZcj38CVCxkpEC-FDOjBw?e=iTRMeW",
          "single crop, batch 4096"),
    _caco("caco_r50_e800_mc_b2048", 800, 75.7, _SP + "EZp5gwlcV4xFn6ir0XVsjFMBzAYIpsOI_AGvNRKeRfCtUw?e=sLpDni",
          "multi-crop, batch 2048"),
    _pcl("v1", 61.5),
    _pcl("v2", 67.6),
    _swav("swav_r50_e800", "SwAV", 800, 75.3, "swav_800ep_pretrain.pth.tar", note="DisCo Tab5/Tab6 teacher"),
    _swav("swav_r50_e400", "SwAV", 400, 74.6, "swav_400ep_pretrain.pth.tar"),
    _swav("swav_r50_e200", "SwAV", 200, 73.9, "swav_200ep_pretrain.pth.tar"),
    _swav("swav_r50_e100", "SwAV", 100, 72.1, "swav_100ep_pretrain.pth.tar"),
    _swav("swav_r50_e200_b256", "SwAV", 200, 72.7, "swav_200ep_bs256_pretrain.pth.tar", note="batch 256"),
    _swav("swav_r50_e400_b256", "SwAV", 400, 74.3, "swav_400ep_bs256_pretrain.pth.tar", note="batch 256"),
    _swav("swav_r50_e400_2x224", "SwAV", 400, 70.1, "swav_400ep_2x224_pretrain.pth.tar", note="2x224, no multi-crop"),
    _swav("deepclusterv2_r50_e800", "DeepCluster-v2", 800, 75.2, "deepclusterv2_800ep_pretrain.pth.tar"),
    _swav("deepclusterv2_r50_e400", "DeepCluster-v2", 400, 74.3, "deepclusterv2_400ep_pretrain.pth.tar"),
    _swav("deepclusterv2_r50_e400_2x224", "DeepCluster-v2", 400, 70.2, "deepclusterv2_400ep_2x224_pretrain.pth.tar"),
    _swav("selav2_r50_e400", "SeLa-v2", 400, 71.8, "selav2_400ep_pretrain.pth.tar"),
    _swav("selav2_r50_e400_2x224", "SeLa-v2", 400, 67.2, "selav2_400ep_2x224_pretrain.pth.tar"),
    _swav("swav_r50w2_e400", "SwAV", 400, 77.3, "swav_RN50w2_400ep_pretrain.pth.tar", arch="resnet50w2",
          note="DisCo resnet50w2 teacher"),
]
#: name → entry
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}
#: networks with the same state-dict keys as a torchvision ResNet-50 (SwAV's stem padding has no weights)
_R50_KEYS = ("resnet50", "mocom_r50", "SWAVresnet50", "DCresnet50", "SELAresnet50")


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def needs_browser(url: str) -> bool:
    from urllib.parse import urlparse
    host = urlparse(url).hostname or ""
    return any(host == h or host.endswith("." + h) for h in BROWSER_HOSTS)


def cache_file(entry: ZooEntry) -> str:
    """Where the zoo entry lives in the cache (hand-fetched files of browser hosts go here too)."""
    return os.path.join(cache_dir(), f"{entry.name}.pth.tar")


def url_cache_file(url: str) -> str:
    """A URL's cache file: ``<sha256(url)[:10]>-<file name>`` (the same name from two hosts does not clash)."""
    from urllib.parse import unquote, urlparse
    base = os.path.basename(unquote(urlparse(url).path)) or "checkpoint"
    return os.path.join(cache_dir(), f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{base}")


def by_url(url: str) -> ZooEntry | None:
    return next((e for e in ZOO.values() if e.url == url), None)


def hand_fetch_message(entry: ZooEntry | None, url: str) -> str:
    what = f"zoo entry {entry.name} ({entry.method}, {entry.host})" if entry else url
    file = f" ({entry.filename})" if entry and entry.filename else ""
    where = f"--pretrained /path/to/the/file, or save it as {cache_file(entry)} and keep using the name" if entry \
        else "--pretrained /path/to/the/file"
    return f"{what} is on a host that needs a browser: open {url} , download the file{file}, then pass {where}"


def resolve(spec: str, what: str = "checkpoint", *, progress: bool = True) -> str:
    """A local path (returned as given), an ``http(s)://`` URL or a zoo name → a local checkpoint file
    (module docstring). Raises :class:`UserError` with one line otherwise."""
    if not spec:
        raise UserError(f"no {what} given")
    if spec.endswith(".part"):
        raise UserError(f"{spec} is an incomplete download, not a checkpoint: pass the URL or zoo name again "
                        "to resume it")
    if os.path.isfile(os.path.expanduser(spec)):
        return os.path.expanduser(spec)
    if is_url(spec):
        entry = by_url(spec)
        if needs_browser(spec):
            if entry and os.path.isfile(cache_file(entry)):
                return cache_file(entry)
            raise UserError(hand_fetch_message(entry, spec))
        if entry:
            return fetch(spec, cache_file(entry), sha256=entry.sha256, md5=entry.md5, progress=progress)
        return fetch(spec, url_cache_file(spec), progress=progress)
    if spec in ZOO:
        entry = ZOO[spec]
        if entry.browser:
            if os.path.isfile(cache_file(entry)):
                return cache_file(entry)
            raise UserError(hand_fetch_message(entry, entry.url))
        return fetch(entry.url, cache_file(entry), sha256=entry.sha256, md5=entry.md5, progress=progress)
    hint = ""
    if os.sep not in spec and not os.path.splitext(spec)[1]:
        close = difflib.get_close_matches(spec, list(ZOO), n=3, cutoff=0.5)
        hint = (f" (not a file, a URL or a zoo name{'; did you mean ' + ', '.join(close) + '?' if close else ''}"
                " see python -m src.zoo list)")
    raise UserError(f"{what} not found: {spec}{hint}")


def check_arch(spec: str, arch: str, flag: str = "--pretrained") -> None:
    """A zoo name given with an ``-a`` its checkpoint cannot load into: one line, before any download."""
    entry = ZOO.get(spec) or (by_url(spec) if is_url(spec) else None)
    if entry is None or os.path.isfile(spec):
        return
    from .models.backbones import canonical_arch
    if canonical_arch(arch) == canonical_arch(entry.arch) or (arch in _R50_KEYS and entry.arch in _R50_KEYS):
        return
    raise UserError(f"{flag} {entry.name} is a {entry.arch} checkpoint ({entry.method}); pass -a {entry.arch} "
                    f"(got -a {arch})")


def resolve_arg(spec: str, flag: str, arch: str | None = None) -> str:
    """For the entry scripts, before any process starts: ``spec`` → local file ('' stays '');
    errors name ``flag`` (``--pretrained checkpoint not found: X``)."""
    if not spec:
        return spec
    if arch is not None:
        check_arch(spec, arch, flag)
    return resolve(spec, f"{flag} checkpoint")


def zoo_entry(spec: str) -> ZooEntry | None:
    """The entry a ``--pretrained`` value names (by name or URL), or None."""
    if not spec or os.path.isfile(spec):
        return None
    return ZOO.get(spec) or (by_url(spec) if is_url(spec) else None)


# ----------------------------------------------------------------------------- the table
def eval_command(e: ZooEntry, data: str = "/path/to/imagenet") -> str:
    return (f"python eval_linear.py --protocol {e.protocol} -a {e.arch} --pretrained {e.name} "
            f"--dump_path linear_eval/{e.name} {data}")


def _top1(e: ZooEntry) -> str:
    return "not stated" if e.top1 is None else f"{e.top1:.1f}"


def _hash(e: ZooEntry) -> str:
    if e.sha256:
        return f"sha256 {e.sha256[:12]}…"
    return f"md5 {e.md5} (no SHA-256)" if e.md5 else "none published"


def markdown_table() -> str:
    """The README's "Released checkpoints" table."""
    rows = ["| name | method | arch | epochs | paper top-1 | host | hash | evaluate |",
            "|---|---|---|---|---|---|---|---|"]
    for e in ZOO.values():
        rows.append(f"| `{e.name}` | {e.method} | {e.arch} | {e.epochs} | {_top1(e)} | {e.host} | {_hash(e)} | "
                    f"`{eval_command(e)}` |")
    return "\n".join(rows)


def text_table() -> str:
    cols = ("name", "method", "arch", "ep", "top-1", "protocol", "layout", "host", "hash", "cached")
    rows = [(e.name, e.method, e.arch, str(e.epochs), _top1(e), e.protocol, f"{e.layout}* ({e.container})",
             e.host, _hash(e), "yes" if os.path.isfile(cache_file(e)) else "no") for e in ZOO.values()]
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{n}}}" for n in w)
    out = [fmt.format(*cols)] + [fmt.format(*r) for r in rows]
    out.append(f"\ncache: {cache_dir()} ($SSL_CACHE). Browser hosts: download by hand, then --pretrained PATH "
               "or save as <cache>/<name>.pth.tar. URLs:")
    out += [f"  {e.name}: {e.url}" for e in ZOO.values()]
    return "\n".join(out)


@cli_main
def main(argv=None) -> None:
    from .cli import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m src.zoo", description="Released checkpoints: list, download",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="print the table", formatter_class=HelpFormatter)
    ls.add_argument("--markdown", action="store_true", help="the README's Markdown rows")
    dl = sub.add_parser("download", help="fetch zoo names / URLs into the cache and print the local paths",
                        formatter_class=HelpFormatter)
    dl.add_argument("specs", nargs="+", metavar="NAME_OR_URL", help="zoo names (see list) or http(s) URLs")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print(markdown_table() if args.markdown else text_table())
        return
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for spec in args.specs:
        print(resolve(spec))


if __name__ == "__main__":
    main()
