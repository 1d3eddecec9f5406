"""`sqgan import` of stylegan2-ada-pytorch network pickles (sqgan.models.ada_pickle, sqgan.commands.import_pickle).

NVIDIA's code cannot be used here, so `ada_pickle_bytes` writes a pickle in the same persistent-object format from
sqgan's own StyleGAN2 (the format as `torch_utils/persistence.py` version 6 and `training/training_loop.py` write
it): a dict {G, D, G_ema, augment_pipe, training_set_kwargs}; each network is stored as
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta = {type: 'class', version: 6, module_src: <source
text>, class_name, state: the module's __dict__ (_parameters, _buffers — the FIR filters included, as ada registers
them persistent — _modules, plain attributes, numpy-scalar weight gains, _init_args, _init_kwargs as
dnnlib.util.EasyDict)}. The discriminator is laid out as ada's: b{res} blocks and the b4 epilogue. (Checked once
outside the project against a pickle NVlabs' own code wrote — its networks.py, persistence and pickle.dump, at
these sizes with conv_clamp 256: the imported G_ema's images and D's logits equal the reference's exactly, and no
dnnlib or torch_utils module was imported.)
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sqgan.config import default_params
from sqgan.models.ada_pickle import ImportRefused, networks_of, read_pickle
from sqgan.models.factory import build_discriminator, build_generator
from sqgan.models.stylegan2 import fir_filter

TINY = ["model.arch=stylegan2", "model.resolution=32", "model.z_dim=32", "model.w_dim=24", "model.channel_base=512",
        "model.channel_max=32", "model.mapping_layers=3", "model.conv_clamp=256", "model.mbstd_group_size=2",
        "fq.enabled=false", "sq.enabled=false"]
ADA_MODULE_SRC = "# training/networks.py of stylegan2-ada-pytorch (text only: an import never runs it)\n"


class _Fake:
    """Registers stand-ins for `torch_utils.persistence` and `dnnlib.util` while a pickle is written, so pickle
    stores the same global names a real snapshot stores."""

    def __enter__(self):
        def _reconstruct_persistent_obj(meta):  # never called by the importer: it maps the name to its own reader
            raise AssertionError("not used when writing")

        class EasyDict(dict):
            pass

        persistence = types.ModuleType("torch_utils.persistence")
        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
        util = types.ModuleType("dnnlib.util")
        EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
        util.EasyDict = EasyDict
        self.mods = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                     "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
        self.saved = {k: sys.modules.get(k) for k in self.mods}
        sys.modules.update(self.mods)
        self.reconstruct, self.EasyDict = _reconstruct_persistent_obj, EasyDict
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _PersistentRecord:
    def __init__(self, fake: _Fake, class_name: str, state: dict, module_src: str = ADA_MODULE_SRC):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)
        self.fake = fake

    def __reduce__(self):
        return (self.fake.reconstruct, (self.meta,))


def _state(fake: _Fake, module: nn.Module, children: dict, attrs: dict | None = None, kwargs: dict | None = None):
    params = collections.OrderedDict((k, v) for k, v in module._parameters.items())
    # FIR filters too: ada registers them persistent, as the 2-D outer product of the 4 taps, and in every
    # DiscriminatorBlock (sqgan keeps the 1-D factor in its conv layers)
    buffers = collections.OrderedDict((k, torch.outer(v, v) if k == "resample_filter" and v.dim() == 1 else v)
                                      for k, v in module._buffers.items())
    if type(module).__name__ == "DiscriminatorBlock" and "resample_filter" not in buffers:
        buffers["resample_filter"] = torch.outer(fir_filter(), fir_filter())
    st = {"training": False, "_parameters": params, "_buffers": buffers, "_non_persistent_buffers_set": set(),
          "_backward_hooks": collections.OrderedDict(), "_forward_hooks": collections.OrderedDict(),
          "_forward_pre_hooks": collections.OrderedDict(), "_state_dict_hooks": collections.OrderedDict(),
          "_load_state_dict_pre_hooks": collections.OrderedDict(), "_modules": collections.OrderedDict(children),
          "_init_args": (), "_init_kwargs": fake.EasyDict(kwargs or {})}
    if "weight" in params and params["weight"] is not None and params["weight"].dim() >= 2:
        fan_in = params["weight"][0].numel()
        st["weight_gain"] = np.float64(1 / np.sqrt(fan_in))  # ada stores numpy scalars among the attributes
    st.update(attrs or {})
    return st


def _tree(fake: _Fake, module: nn.Module):
    """A sqgan (sub)module as nested persistent records, by its own class name and children (G: ada's layout)."""
    children = {name: _tree(fake, sub) for name, sub in module._modules.items() if sub is not None}
    return _PersistentRecord(fake, type(module).__name__, _state(fake, module, children))


def ada_pickle_bytes(G: nn.Module, G_ema: nn.Module, D: nn.Module, p, *, c_dim: int = 0, extra_g: dict | None = None,
                     synthesis_src: str = ADA_MODULE_SRC, mapping_kwargs: dict | None = None) -> bytes:
    m = p.model
    with _Fake() as fake:
        def generator(g: nn.Module):
            gk = fake.EasyDict(z_dim=m.z_dim, c_dim=c_dim, w_dim=m.w_dim, img_resolution=m.resolution, img_channels=3,
                               mapping_kwargs=fake.EasyDict(mapping_kwargs or {"num_layers": m.mapping_layers}),
                               synthesis_kwargs=fake.EasyDict(channel_base=m.channel_base, channel_max=m.channel_max,
                                                              num_fp16_res=4, conv_clamp=int(m.conv_clamp)))
            mapping = _tree(fake, g.mapping)
            mapping.meta["state"].update(num_layers=m.mapping_layers, w_avg_beta=0.995, z_dim=m.z_dim, c_dim=c_dim)
            synthesis = _tree(fake, g.synthesis)
            synthesis.meta["module_src"] = synthesis_src
            children = {"synthesis": synthesis, "mapping": mapping} | (extra_g or {})
            return _PersistentRecord(fake, "Generator", _state(fake, g, children, dict(
                z_dim=m.z_dim, c_dim=c_dim, w_dim=m.w_dim, img_resolution=m.resolution, img_channels=3,
                num_ws=g.num_ws), gk))

        trunk = D.trunk
        blocks = {f"b{res}": _tree(fake, blk) for res, blk in zip(trunk.block_resolutions, trunk.blocks, strict=True)}
        head = trunk.head
        epilogue = {"mbstd": _PersistentRecord(fake, "MinibatchStdLayer", _state(fake, head.mbstd, {}, dict(
            group_size=m.mbstd_group_size, num_channels=m.mbstd_num_channels))),
            "conv": _tree(fake, head.conv), "fc": _tree(fake, head.fc), "out": _tree(fake, head.out)}
        blocks["b4"] = _PersistentRecord(fake, "DiscriminatorEpilogue", _state(fake, head, epilogue))
        dk = fake.EasyDict(c_dim=c_dim, img_resolution=m.resolution, img_channels=3, architecture="resnet",
                           channel_base=m.channel_base, channel_max=m.channel_max, num_fp16_res=4,
                           conv_clamp=int(m.conv_clamp), cmap_dim=None, block_kwargs=fake.EasyDict(),
                           mapping_kwargs=fake.EasyDict(),
                           epilogue_kwargs=fake.EasyDict(mbstd_group_size=m.mbstd_group_size))
        disc = _PersistentRecord(fake, "Discriminator", _state(fake, nn.Module(), blocks, None, dk))
        snapshot = {"training_set_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "ffhq.zip",
                                            "use_labels": False, "max_size": 70000, "xflip": True,
                                            "resolution": m.resolution},
                    "G": generator(G), "D": disc, "G_ema": generator(G_ema),
                    "augment_pipe": _PersistentRecord(fake, "AugmentPipe", _state(fake, nn.Module(), {}, dict(
                        xflip=1.0, rotate90=1.0)))}
        return pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """sqgan networks with every tensor randomised (noise strengths and biases too, so each one matters) and the
    ada-format pickle of them."""
    p = default_params(TINY)
    torch.manual_seed(3)
    G, G_ema, D = build_generator(p), build_generator(p), build_discriminator(p)
    with torch.no_grad():
        for net in (G, G_ema, D):
            for name, t in net.state_dict().items():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t) * (0.3 if "bias" in name or "noise_strength" in name else 1.0))
    pkl = tmp_path_factory.mktemp("ada") / "network-snapshot-000120.pkl"
    pkl.write_bytes(ada_pickle_bytes(G, G_ema, D, p))
    return {"params": p, "G": G, "G_ema": G_ema, "D": D, "pkl": pkl}


def test_every_tensor_arrives_and_images_and_logits_equal_the_source(source):
    p, pkl = source["params"], source["pkl"]
    nets = networks_of(read_pickle(pkl), pkl)
    for k in ("resolution", "z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "conv_clamp",
              "mbstd_group_size"):
        assert nets.model[k] == getattr(p.model, k), k
    assert nets.model["mbstd_num_channels"] == 1 and p.model.mbstd_num_channels is None  # StyleGAN2's unset = 1
    for part in ("G", "G_ema"):
        own = source[part].state_dict()
        assert set(own) <= set(nets.__dict__[part]) and all(torch.equal(own[k], nets.__dict__[part][k]) for k in own)

    from sqgan.commands.import_pickle import imported_params
    from sqgan.models.ada_pickle import load_into

    q = imported_params(default_params([]), nets.model)
    G, D = build_generator(q), build_discriminator(q)
    load_into(G, nets.G_ema, "G_ema", pkl)
    load_into(D, nets.D, "D", pkl)
    z = torch.randn(6, p.model.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = G.eval()(z, noise_mode="const").images
        b = source["G_ema"].eval()(z, noise_mode="const").images
        assert torch.equal(a, b) and a.std() > 0.01
        assert torch.equal(G.mapping.w_avg, source["G_ema"].mapping.w_avg)
        x = torch.randn(4, 3, 32, 32)
        assert torch.equal(D(x).logits, source["D"](x).logits)


def test_sqgan_import_writes_a_run_that_sample_and_eval_use(source, demo_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sqgan.commands.eval import run_eval
    from sqgan.commands.import_pickle import run_import
    from sqgan.commands.sample import run_sample

    monkeypatch.chdir(tmp_path)
    sets = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"mlflow.artifact_root={tmp_path / 'art'}"]
    params = default_params(sets)
    r = run_import(params, source["pkl"], tmp_path / "imported", data_dir=demo_dir)
    assert r.kimg == 120 and r.checkpoint.is_file()
    client = MlflowClient(r.tracking_uri)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sqgan.stage"] == "import"
    import hashlib

    assert run.data.tags["sqgan.import.sha256"] == hashlib.sha256(source["pkl"].read_bytes()).hexdigest()
    assert run.data.params["ada.G.synthesis_kwargs.conv_clamp"] == "256"
    assert run.data.params["ada.D.epilogue_kwargs.mbstd_group_size"] == "2"
    assert run.data.params["model.channel_max"] == "32" and run.data.params["fq.enabled"] == "False"
    assert json.loads((tmp_path / "imported" / "tracking.json").read_text())["run_id"] == r.run_id

    small = sets + ["sample.num=8", "sample.centres=4", "sample.fit_samples=256", "sample.batch_size=32",
                    "sample.truncation=multimodal", "sample.psi=0.7"]
    s = run_sample(default_params(small), checkpoint=tmp_path / "imported", progress=False)
    assert s.images == 8 and (s.out / "grid.png").is_file() and s.out.parent.parent == tmp_path / "imported"

    ev = run_eval(default_params(sets + ["eval.metrics=[fid]", "eval.num_fake=32", "metrics.batch_size=16"]),
                  checkpoint=tmp_path / "imported", data_dir=demo_dir, progress=False)
    assert ev.run_id == r.run_id and not ev.new_run and math.isfinite(next(iter(ev.metrics.values())))
    by_run = run_sample(default_params(small + ["sample.truncation=none"]), run_id=r.run_id, out=tmp_path / "by-run",
                        progress=False)  # --run RUN_ID: the checkpoint the import logged
    assert by_run.images == 8 and by_run.step == 0
    # an earlier import is replaced only with --force; a folder another stage wrote is refused
    from sqgan.io import UnsafeOutput

    with pytest.raises(UnsafeOutput, match="earlier 'import' output"):
        run_import(params, source["pkl"], tmp_path / "imported", data_dir=demo_dir)


def _refused(tmp_path, payload: bytes, match: str):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(payload)
    with pytest.raises(ImportRefused, match=match):
        from sqgan.commands.import_pickle import run_import

        run_import(default_params([f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]), bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_runs_nothing_and_other_kinds_are_named(source, tmp_path):
    marker = tmp_path / "pwned"
    _refused(tmp_path, pickle.dumps({"G_ema": _Hostile(marker)}), r"asks for (posix|os)\.system.*nothing in it was "
                                                                    r"executed")
    assert not marker.exists()
    _refused(tmp_path, source["pkl"].read_bytes()[:5000], "truncated")
    _refused(tmp_path, b"not a pickle at all", "not a readable pickle")

    class Network:  # what a TensorFlow StyleGAN2 pickle holds
        pass

    Network.__module__, Network.__qualname__ = "dnnlib.tflib.network", "Network"
    tf = types.ModuleType("dnnlib.tflib.network")
    tf.Network = Network
    saved = {k: sys.modules.get(k) for k in ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network")}
    sys.modules.update({"dnnlib": types.ModuleType("dnnlib"), "dnnlib.tflib": types.ModuleType("dnnlib.tflib"),
                        "dnnlib.tflib.network": tf})
    try:
        payload = pickle.dumps({"G_ema": Network()})
    finally:
        for k, v in saved.items():
            sys.modules.pop(k, None) if v is None else sys.modules.__setitem__(k, v)
    _refused(tmp_path, payload, "TensorFlow StyleGAN pickle.*legacy.py")

    p = source["params"]
    args = (source["G"], source["G_ema"], source["D"], p)
    _refused(tmp_path, ada_pickle_bytes(*args, c_dim=10), r"class-conditional network \(c_dim = 10\)")
    _refused(tmp_path, ada_pickle_bytes(*args, synthesis_src="class SynthesisInput(torch.nn.Module): ..."),
             "StyleGAN3")
    _refused(tmp_path, pickle.dumps({"G": 1}), "no G_ema network in it")
    _refused(tmp_path, ada_pickle_bytes(*args, mapping_kwargs={"num_layers": 3, "lr_multiplier": 0.1}),
             "lr_multiplier is 0.1")
    box = build_generator(p)
    box.load_state_dict(source["G_ema"].state_dict())
    for m in box.modules():
        if "resample_filter" in m._buffers:
            m._buffers["resample_filter"] = torch.full([4], 0.25)  # a box filter: same shape, other values
    _refused(tmp_path, ada_pickle_bytes(box, box, source["D"], p), "resampling filter")


def test_a_pickle_whose_tensors_do_not_fit_its_kwargs_is_refused_naming_the_tensor(source, tmp_path):
    p = source["params"]
    G = build_generator(p)
    with torch.no_grad():
        G.synthesis.b8.conv0.weight.data = torch.randn(32, 32, 5, 5)  # a 5×5 kernel where the kwargs build 3×3
    _refused(tmp_path, ada_pickle_bytes(G, G, source["D"], p), r"synthesis.b8.conv0.weight has shape \[32, 32, 5, 5\]")


def test_train_init_from_an_import_fine_tunes_it_with_fq_and_sq_switched_on(source, demo_dir, tmp_path, monkeypatch):
    from sqgan.commands.import_pickle import run_import
    from sqgan.train.checkpoint import load_checkpoint
    from sqgan.train.loop import init_source, train

    monkeypatch.chdir(tmp_path)
    sets = [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"mlflow.artifact_root={tmp_path / 'art'}"]
    run_import(default_params(sets), source["pkl"], tmp_path / "imported", data_dir=demo_dir)

    model = [s for s in TINY if s.startswith("model.")]
    tune = default_params(model + ["fq.enabled=true", "sq.enabled=true", "fq.codebook_size=16", "sq.codebook_size=16",
                                   f"train.init_from={tmp_path / 'imported'}", "train.steps=1", "train.batch_size=4",
                                   "train.lr_g=1e-12", "train.lr_d=1e-12", "metrics.eval_every=0",
                                   "metrics.num_fake=8", "metrics.names=[fid]", "metrics.diversity_every=0",
                                   "train.sample_every=1", "model.style_mixing=0"])
    train(tune, demo_dir, tmp_path / "tuned")
    got = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "step_000001.pt")
    # one step at a negligible learning rate: G is the source's G, and G_ema = lerp(source G_ema, G, 1 − β₀), β₀ = 0.1
    from sqgan.train.loop import ema_beta

    src, src_g, beta = source["G_ema"].state_dict(), source["G"].state_dict(), ema_beta(0, tune.train.g_ema_decay)
    for k in ("synthesis.b32.conv1.weight", "mapping.fc0.weight", "synthesis.b4.const"):
        assert torch.allclose(got["G"][k], src_g[k], atol=1e-5), k
        assert torch.allclose(got["G_ema"][k], beta * src[k] + (1 - beta) * src_g[k], atol=1e-5), k
    # w_avg (a buffer: G_ema copies G's) went on from the imported G's (one G step: 0.5 % of the way to the batch's
    # mean w), not from zero
    assert torch.allclose(got["G_ema"]["mapping.w_avg"], src_g["mapping.w_avg"], rtol=0.03, atol=0.02)
    assert "quantizer.codebook" in got["G_ema"] and any(k.startswith("quantizers.") for k in got["D"])
    assert torch.allclose(got["D"]["trunk.head.out.weight"], source["D"].state_dict()["trunk.head.out.weight"],
                          atol=1e-5)

    other = default_params(model + ["model.channel_max=16", f"train.init_from={tmp_path / 'imported'}"])
    with pytest.raises(ValueError, match=r"model.channel_max: 32 \(there\) vs 16"):
        init_source(other)


def test_the_cli_refuses_a_hostile_pickle_in_one_line_and_imports_a_good_one(source, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sqgan.cli import app

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"G_ema": _Hostile(tmp_path / "pwned")}))
    sets = ["--no-params-file", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", "--set",
            f"mlflow.artifact_root={tmp_path / 'art'}"]
    r = CliRunner().invoke(app, ["import", str(bad), "--out", "run", *sets])
    assert r.exit_code == 1 and "nothing in it was executed" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()
    r = CliRunner().invoke(app, ["import", str(source["pkl"]), "--out", "run", *sets])
    assert r.exit_code == 0 and "StyleGAN2 32px, z 32, w 24, 3 mapping layers" in r.output, r.output
