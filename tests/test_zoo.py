"""Checkpoint zoo: downloads from a local HTTP server (cache hit, hash mismatch, interrupted and resumed
transfers, 404, concurrent callers), browser-only hosts, every zoo layout through ``load_backbone``,
and ``eval_linear.py`` / ``scripts/export_backbone.py`` / the DisCo teacher loader from a URL or zoo name."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import eval_linear
from src import download, zoo
from src.checkpoint import PREFIXES, load_backbone, load_checkpoint
from src.errors import UserError
from src.eval.linear_presets import PRESETS
from src.models.backbones import arch_spec, build_encoder
from src.models.heads import moco_head
from src.models.swav_resnet import swav_projection_head
from tests.conftest import ROOT


# ----------------------------------------------------------------------------- a local HTTP server
class Handler(BaseHTTPRequestHandler):
    """Serves ``files``; ``mode[path]``: ok | cut (the body stops half-way through, ``cuts`` times) |
    html | slow. Honours ``Range: bytes=N-``. Every request is recorded in ``log`` as (path, range)."""
    files: ClassVar[dict[str, bytes]] = {}
    mode: ClassVar[dict[str, str]] = {}
    cuts = 0
    log: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self):
        path, rng = self.path, self.headers.get("Range")
        Handler.log.append((path, rng))
        if path not in Handler.files:
            self.send_error(404, "Not Found")
            return
        data, mode = Handler.files[path], Handler.mode.get(path, "ok")
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "text/html" if mode == "html" else "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if mode == "cut" and Handler.cuts > 0:
            Handler.cuts -= 1
            body = body[: len(body) // 2]  # then the connection closes: a short body
            self.close_connection = True
        if mode == "slow":
            threading.Event().wait(0.3)
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    monkeypatch.setenv("SSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(download, "RETRY_SLEEP", 0.0)
    Handler.files, Handler.mode, Handler.cuts, Handler.log = {}, {}, 0, []
    return tmp_path / "cache"


def serve(path: str, obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    Handler.files[path] = buf.getvalue()
    return Handler.files[path]


def small_ckpt(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"epoch": 3, "state_dict": {"module.encoder_q.w": torch.randn(300, 1000, generator=g)}}  # ~1.2 MB


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- downloads
def test_download_once_then_cache_hit(cache, server, monkeypatch):
    data = serve("/a/ckpt.pth.tar", small_ckpt())
    url = server + "/a/ckpt.pth.tar"
    path = zoo.resolve(url)
    assert os.path.dirname(path) == str(cache) and path.endswith("-ckpt.pth.tar")
    name = os.path.basename(path)
    assert Path(path).read_bytes() == data and sorted(os.listdir(cache)) == [name, name + ".lock"]  # no .part
    want = small_ckpt()["state_dict"]["module.encoder_q.w"]
    assert torch.equal(load_checkpoint(url)["state_dict"]["module.encoder_q.w"], want)
    assert zoo.resolve(url) == path and len(Handler.log) == 1  # the second call is a cache hit
    # a zoo name: its own cache file, verified against the known SHA-256
    entry = replace(zoo.ZOO["pcl_v2_r50_e200"], name="tiny", url=url, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.ZOO, "tiny", entry)
    assert zoo.resolve("tiny") == str(cache / "tiny.pth.tar") and len(Handler.log) == 2
    assert zoo.resolve(url) == str(cache / "tiny.pth.tar")  # the entry's URL maps to the entry


def test_hash_mismatch_is_refused_and_deleted(cache, server, monkeypatch):
    data = serve("/b.pth", small_ckpt())
    bad = replace(zoo.ZOO["pcl_v2_r50_e200"], name="bad", url=server + "/b.pth", sha256="0" * 64)
    monkeypatch.setitem(zoo.ZOO, "bad", bad)
    with pytest.raises(UserError) as e:
        zoo.resolve("bad")
    assert one_line(e).startswith("SHA-256 mismatch for " + server + "/b.pth: expected " + "0" * 64)
    assert hashlib.sha256(data).hexdigest() in str(e.value)
    assert [f for f in os.listdir(cache) if not f.endswith(".lock")] == []  # neither the file nor a .part
    monkeypatch.setitem(zoo.ZOO, "bad", replace(bad, sha256=None, md5="deadbeef"))
    with pytest.raises(UserError, match=r"^md5 mismatch .* expected deadbeef\.\.\., got " + hashlib.md5(data).hexdigest()):
        zoo.resolve("bad")
    monkeypatch.setitem(zoo.ZOO, "bad", replace(bad, sha256=None, md5=hashlib.md5(data).hexdigest()[:8]))
    assert Path(zoo.resolve("bad")).read_bytes() == data  # the published md5 prefix passes


def test_interrupted_download_is_never_a_checkpoint_and_resumes(cache, server):
    data = serve("/c.pth.tar", small_ckpt(1))
    url = server + "/c.pth.tar"
    Handler.mode["/c.pth.tar"], Handler.cuts = "cut", 3  # every attempt of the first call is cut short
    with pytest.raises(UserError) as e:
        zoo.resolve(url)
    assert re.match(r"download of .* failed after 3 attempts \(connection closed at \d+ of \d+ bytes\); "
                    r"\d+ bytes kept in .*\.part", one_line(e))
    dest = zoo.url_cache_file(url)
    part = dest + ".part"
    kept = os.path.getsize(part)
    assert not os.path.exists(dest) and len(data) // 2 < kept < len(data)  # each attempt got further
    assert len(Handler.log) == 3 and all(r is not None for _, r in Handler.log[1:])  # attempts 2-3 resumed
    for bad in (part, dest):  # the partial file is never loaded as a checkpoint
        with pytest.raises(UserError, match="incomplete download|not found"):
            load_checkpoint(bad)
    assert zoo.resolve(url) == dest and Path(dest).read_bytes() == data  # the retry resumes and completes
    assert Handler.log[-1] == ("/c.pth.tar", f"bytes={kept}-") and not os.path.exists(part)
    assert torch.equal(load_checkpoint(dest)["state_dict"]["module.encoder_q.w"],
                       small_ckpt(1)["state_dict"]["module.encoder_q.w"])


def test_404_html_and_browser_hosts_are_one_line(cache, server, capsys):
    with pytest.raises(SystemExit) as e:
        zoo.main(["download", server + "/missing.pth"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: cannot download {server}/missing.pth: HTTP 404 Not Found"
    serve("/page", {"x": 1})
    Handler.mode["/page"] = "html"
    with pytest.raises(UserError, match="returned an HTML page, not a checkpoint"):
        zoo.resolve(server + "/page")
    assert [f for f in os.listdir(cache) if not f.endswith(".lock")] == []
    with pytest.raises(UserError) as e:  # Google Drive: fetched by hand, then by path or under the zoo name
        zoo.resolve("sogclr_r50_e800")
    msg = one_line(e)
    assert "needs a browser" in msg and zoo.ZOO["sogclr_r50_e800"].url in msg and "checkpoint_0799.pth.tar" in msg
    with pytest.raises(UserError, match="needs a browser"):
        zoo.resolve(zoo.ZOO["caco_r50_e200_b1024"].url)
    os.makedirs(cache, exist_ok=True)
    (cache / "sogclr_r50_e800.pth.tar").write_bytes(b"x")
    assert zoo.resolve("sogclr_r50_e800") == str(cache / "sogclr_r50_e800.pth.tar")
    with pytest.raises(UserError, match=r"checkpoint not found: lorac_r50_e20 .*did you mean lorac_r50_e200"):
        zoo.resolve("lorac_r50_e20")
    assert Handler.log == [("/missing.pth", None), ("/page", None)]  # nothing else went to the network


def test_concurrent_callers_download_once(cache, server):
    data = serve("/d.pth", small_ckpt(2))
    Handler.mode["/d.pth"] = "slow"
    out: list[str] = []
    threads = [threading.Thread(target=lambda: out.append(zoo.resolve(server + "/d.pth", progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and len(set(out)) == 1 and Path(out[0]).read_bytes() == data
    assert Handler.log == [("/d.pth", None)]


# ----------------------------------------------------------------------------- the table
def official_checkpoint(entry: zoo.ZooEntry, enc: torch.nn.Module) -> dict:
    """A synthetic checkpoint with the official key names of ``entry``'s release (resnet18-sized)."""
    sd = enc.state_dict()
    if entry.layout == "module.encoder_q.":  # MoCo, PCL, MoCo-M/LORAC, CaCo: the DDP MoCo builder
        planes = 2 if entry.protocol == "lorac" else 1
        state = {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                 **{f"module.encoder_k.{k}": v + 1 for k, v in sd.items()},
                 "module.queue": torch.randn(*([planes] if planes > 1 else []), 16, 32),
                 "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        extra = {"Memory_Bank": {"W": torch.randn(16, 32), "v": torch.zeros(16, 32)}} if entry.protocol == "caco" else {}
        return {"epoch": entry.epochs, "arch": entry.arch, "state_dict": state, "optimizer": {}, **extra}
    if entry.layout == "module.base_encoder.":  # SogCLR: projector under base_encoder.fc, u outside
        return {"epoch": 800, "arch": "resnet50", "state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()},
                "optimizer": {}, "scaler": {}, "u": torch.zeros(11, 1)}
    assert entry.layout == "module." and entry.container == "top level"  # SwAV / DeepCluster-v2 / SeLa-v2 raw
    raw = {f"module.{k}": v for k, v in sd.items() if not k.startswith("projection_head.")}
    raw.update({f"module.{k}": v for k, v in sd.items() if k.startswith("projection_head.")})
    if entry.method == "SwAV":
        raw["module.prototypes.weight"] = torch.randn(30, 16)
    else:  # MultiPrototypes
        raw.update({f"module.prototypes.prototypes{i}.weight": torch.randn(30, 16) for i in range(3)})
    return raw


def layout_kind(entry: zoo.ZooEntry) -> str:
    """Entries whose official files have the same key names share a kind (MoCo and PCL: the MoCo builder)."""
    if entry.layout == "module.":
        extra = "prototypes" if entry.method == "SwAV" else "multi-prototypes"
    else:
        extra = {"lorac": "two-plane queue", "caco": "Memory_Bank"}.get(entry.protocol, entry.layout.split(".")[1])
    return f"{entry.layout} in {entry.container}, {extra}"


KINDS = {layout_kind(e): e.name for e in zoo.ZOO.values()}  # one representative entry per distinct layout


def test_every_entry_is_well_formed():
    assert set(KINDS) and all(layout_kind(e) in KINDS for e in zoo.ZOO.values())
    for e in zoo.ZOO.values():
        assert e.layout in PREFIXES and e.container in ("state_dict", "top level"), e.name
        assert arch_spec(e.arch).feat_dim >= 2048 and e.protocol in PRESETS, e.name
        assert e.url.startswith("https://") and e.browser == zoo.needs_browser(e.url), e.name
        assert e.top1 is None or 50 < e.top1 < 80, e.name
        assert e.sha256 is None  # no README publishes one; never invented
    assert zoo.ZOO["lorac_r50_e200"].top1 is None and zoo.ZOO["moco_v2_r50_e800"].md5 == "a04e12f8"


@pytest.fixture(scope="module")
def encoders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"module.": build_encoder("resnet18", swav_projection_head(512, 32, 16)),
            "other": build_encoder("resnet18", moco_head(512, 16, mlp=True))}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_zoo_layout_loads_with_load_backbone(kind, tmp_path, encoders):
    entry = zoo.ZOO[KINDS[kind]]
    enc = encoders["module." if entry.layout == "module." else "other"]
    path = str(tmp_path / "official.pth.tar")
    torch.save(official_checkpoint(entry, enc), path)
    model = load_backbone(path, "resnet18")
    assert model.loaded_prefix == entry.layout
    want = {k: v for k, v in enc.state_dict().items() if not k.startswith(("fc.", "projection_head."))}
    assert set(model.state_dict()) == set(want)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())  # encoder_q, never encoder_k


def test_list_and_readme_table(capsys):
    zoo.main(["list"])
    out = capsys.readouterr().out
    assert all(name in out for name in zoo.ZOO) and "not stated" in out and "none published" in out
    readme = Path(ROOT, "README.md").read_text()
    assert zoo.markdown_table() in readme  # the README's table is the zoo's
    for e in zoo.ZOO.values():
        assert f"--protocol {e.protocol} -a {e.arch} --pretrained {e.name} " in readme


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def r18_ckpt() -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(3)
    enc = build_encoder("resnet18", moco_head(512, 16, mlp=True))
    return {"epoch": 200, "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, enc


def test_eval_linear_and_teacher_from_a_zoo_name(cache, server, monkeypatch, tiny_folder, tmp_path, r18_ckpt, capsys):
    data = serve("/zoo/r18.pth.tar", r18_ckpt[0])
    entry = replace(zoo.ZOO["pcl_v2_r50_e200"], name="tiny_r18", arch="resnet18", url=server + "/zoo/r18.pth.tar",
                    sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.ZOO, "tiny_r18", entry)
    out = str(tmp_path / "lin")
    common = [tiny_folder, "--pretrained", "tiny_r18", "--dump_path", out, "-j", "0", "--image_size", "32",
              "-b", "8", "--max_iters", "1", "--epochs", "1", "-p", "100"]
    with pytest.raises(SystemExit):  # wrong -a: refused before any download
        eval_linear.main(common + ["-a", "resnet50"])
    assert capsys.readouterr().err.strip() == ("error: --pretrained tiny_r18 is a resnet18 checkpoint (PCL v2); "
                                               "pass -a resnet18 (got -a resnet50)")
    assert Handler.log == []
    eval_linear.main(common + ["-a", "resnet18"])
    res = json.loads(Path(out, "results.json").read_text())
    assert res["protocol"] == "pcl"  # no flag spelling names a recipe: the zoo entry's (PCL) is used
    assert res["pretrained_source"] == "tiny_r18" and res["pretrained"] == str(cache / "tiny_r18.pth.tar")
    assert Handler.log == [("/zoo/r18.pth.tar", None)]
    from src.models.teacher import load_teacher  # DisCo --teacher by zoo name: the cached file, hashed
    teacher, info = load_teacher("tiny_r18", "resnet18", dim=16)
    assert info.path == str(cache / "tiny_r18.pth.tar") and info.sha256 == entry.sha256
    assert torch.equal(teacher.fc[2].weight, r18_ckpt[1].fc[2].weight) and len(Handler.log) == 1


def test_export_backbone_from_a_url(cache, server, tmp_path, r18_ckpt):
    serve("/x/r18.pth", r18_ckpt[0])
    spec = importlib.util.spec_from_file_location("export_backbone", os.path.join(ROOT, "scripts", "export_backbone.py"))
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    for i in range(2):
        export.main(["--pretrained", server + "/x/r18.pth", "-a", "resnet18", "-o", str(tmp_path / f"o{i}.pth")])
    sd = torch.load(tmp_path / "o1.pth", weights_only=True)
    want = {k: v for k, v in r18_ckpt[1].state_dict().items() if not k.startswith("fc.")}
    assert set(sd) == set(want) and all(torch.equal(sd[k], v) for k, v in want.items())
    assert Handler.log == [("/x/r18.pth", None)]  # downloaded once, the second export read the cache


def test_pretraining_resume_from_a_url(cache, server, tmp_path):
    from src.engine import CheckpointPolicy
    from src.engine.resume import decide
    serve("/run/checkpoint_0041.pth.tar", {"epoch": 42, "iter": 0, "state_dict": {}, "optimizer": {}})
    url = server + "/run/checkpoint_0041.pth.tar"
    plan, ck = decide(CheckpointPolicy(str(tmp_path / "out")), url, auto_resume=True)
    assert plan.path == zoo.url_cache_file(url) and plan.source == url and (plan.epoch, ck["epoch"]) == (42, 42)
    with pytest.raises(UserError, match=r"--resume checkpoint not found: nope\.pth"):
        decide(CheckpointPolicy(str(tmp_path / "out")), "nope.pth", auto_resume=True)
