"""SD1.5- and SDXL-structured pipelines end to end through the CLI (tiny, built from configs, no downloads), the
official-format step-aware preference model, and LoRA in the diffusers format."""

import json

import pytest
import torch
from tiny_models import assert_teacher_gradient, make_tiny_pipeline

from spo_fast.pipeline import adapters_disabled, add_lora, load_components, save_lora
from spo_fast.preference import make_tiny_step_aware_model
from spo_fast.train import main


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    sd15 = make_tiny_pipeline(root / "sd15", "sd15")
    sdxl = make_tiny_pipeline(root / "sdxl", "sdxl")
    backbone, ckpt = make_tiny_step_aware_model(root / "spm")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([{"caption": c} for c in ("a red cat", "two dogs on a sofa", "a blue car")]))
    return dict(sd15=sd15, sdxl=sdxl, backbone=backbone, ckpt=ckpt, prompts=prompts, root=root)


def _args(w, preset, out):
    return [
        "--preset", preset, "--model.pretrained", str(w[preset]), "--model.dtype", "fp32",
        "--preference.backbone", str(w["backbone"]), "--preference.processor", str(w["backbone"]),
        "--preference.checkpoint", str(w["ckpt"]), "--data.prompts", str(w["prompts"]),
        "--train.iterations", "2", "--train.mixed_precision", "no", "--train.device", "cpu",
        "--sampling.batch_size", "2", "--sampling.num_steps", "6", "--sampling.divert_step", "1",
        "--sampling.threshold", "0.0", "--model.vae", "", "--log.output_dir", str(out), "--log.progress", "false",
    ]  # fmt: skip


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_two_iterations_through_the_cli(tiny_world, tmp_path, preset):
    out = tmp_path / "run"
    assert main(_args(tiny_world, preset, out)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["pairs"] > 0 and "loss" in r for r in rows)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "report.png").is_file() and (out / "checkpoints" / "latest").is_file()
    if preset == "sdxl":  # inner_steps 3: win and lose chains have their own parents
        assert json.loads((out / "config.json").read_text())["sampling"]["inner_steps"] == 3


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_round_trip_through_load_lora_weights(tiny_world, tmp_path, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comp = load_components(str(tiny_world[kind]))
    params = add_lora(comp.unet, rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # a trained-looking adapter (B is zero at init)
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    path = save_lora(comp.unet, tmp_path / "lora", kind)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_world[kind])
    pipe.load_lora_weights(path.parent)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 20])
    emb = torch.randn(2, 5, comp.unet.config.cross_attention_dim, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        ours = comp.unet(x, t, emb, added_cond_kwargs=added).sample
        theirs = pipe.unet(x, t, emb, added_cond_kwargs=added).sample
        comp.unet.disable_adapters()
        base = comp.unet(x, t, emb, added_cond_kwargs=added).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - base).abs().max() > 1e-3, "the adapter must change the output for this test to mean anything"


def test_adapters_disabled_is_the_base_model_and_restores_the_adapter(tiny_world):
    """SPO's reference under LoRA: the same UNet with its adapters off. The cached toggle must give exactly the
    output of the base weights (diffusers' own disable_adapters), and afterwards the trained adapter again, with
    its parameters still trainable; a second adapter set invalidates the cache."""
    comp = load_components(str(tiny_world["sd15"]))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20])
    emb = torch.randn(2, 5, comp.unet.config.cross_attention_dim, generator=g)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        adapters_disabled(comp.unet)
    with torch.no_grad():
        plain = comp.unet(x, t, emb).sample
    params = add_lora(comp.unet, rank=4)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        lora = comp.unet(x, t, emb).sample
        with adapters_disabled(comp.unet):
            ref = comp.unet(x, t, emb).sample
        again = comp.unet(x, t, emb).sample
    assert (lora - plain).abs().max() > 1e-3
    torch.testing.assert_close(ref, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, lora, rtol=0, atol=0)
    assert all(p.requires_grad for p in params)
    first = adapters_disabled(comp.unet).layers
    lora_config = type(comp.unet.peft_config["default"])
    comp.unet.add_adapter(lora_config(r=2, target_modules=["to_q"]), "second")
    second = adapters_disabled(comp.unet).layers
    assert second is not first
    comp.unet.delete_adapters("second")  # and again under the same name: a new adapter, so the layers are found anew
    comp.unet.add_adapter(lora_config(r=2, target_modules=["to_k"]), "second")
    assert adapters_disabled(comp.unet).layers is not second


def test_bad_model_inputs_fail_early(tiny_world, tmp_path, capsys):
    args = _args(tiny_world, "sd15", tmp_path / "a")
    i = args.index("--model.pretrained")
    args[i + 1] = str(tmp_path / "missing")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    args[i + 1] = str(tiny_world["root"])  # a folder, not a diffusers pipeline
    args[args.index("--log.output_dir") + 1] = str(tmp_path / "b")
    assert main(args) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    sdxl_on_sd15 = _args(tiny_world, "sdxl", tmp_path / "c")
    sdxl_on_sd15[sdxl_on_sd15.index("--model.pretrained") + 1] = str(tiny_world["sd15"])
    assert main(sdxl_on_sd15) == 2
    assert "holds an sd15 pipeline, not sdxl" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_noisy_latent_head_with_the_step_aware_teacher(tiny_world, tmp_path, preset, caplog):
    """The head's real-model path: the official-format step-aware model teaches `python -m spo_fast.train_head` on an
    SD1.5- or SDXL-structured pipeline (its gradient through the lookahead, the VAE decoder and the CLIP preprocessing
    checked against central differences), and the head it writes drives SPO through the training CLI (verified, and
    refreshed with the teacher keeping the noisier steps)."""
    from spo_fast.head import _teacher_gradient, load_head
    from spo_fast.pipeline import CFGDenoiser, PromptEncoder
    from spo_fast.preference import StepAwarePreferenceModel
    from spo_fast.sampler import PoolSampler, PoolSamplerConfig
    from spo_fast.train_head import main as train_head
    from spo_fast.train_head import write_head_report

    w = tiny_world
    comps = load_components(str(w[preset]))
    enc = PromptEncoder(comps)
    teacher = StepAwarePreferenceModel.from_pretrained(
        backbone=w["backbone"], checkpoint=w["ckpt"], processor=str(w["backbone"])
    ).eval()
    prompts = ["a red cat", "a blue car"]
    cond = enc(prompts)
    den = CFGDenoiser(comps.unet, enc([""]), 5.0)
    cfg = PoolSamplerConfig(num_steps=6, num_candidates=2, divert_step=1, threshold=0.0, lookahead_steps=1)
    sampler = PoolSampler(den, comps.scheduler, teacher, cfg)
    t = int(sampler.timesteps[2])
    mean = torch.randn(2, *comps.latent_shape, generator=torch.Generator().manual_seed(1))
    grad = _teacher_gradient(sampler, comps, teacher, mean, t, cond, prompts)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0

    assert_teacher_gradient(sampler, comps, den, teacher, mean, t, cond, prompts, grad, h=1e-2, atol=1e-4, seed=2)

    out = tmp_path / "head"
    # the preset gives the trainer's teacher kind and pool settings; the held-out prompts are every 10th of the file
    args = ["--preset", preset, "--model.pretrained", str(w[preset]), "--teacher.backbone", str(w["backbone"]),
            "--teacher.processor", str(w["backbone"]), "--teacher.checkpoint", str(w["ckpt"]),
            "--data.prompts", str(w["prompts"]), "--data.train_passes", "2", "--data.eval_passes", "2",
            "--data.batch_size", "2", "--sampling.num_steps", "6", "--sampling.divert_step", "1",
            "--sampling.threshold", "0.0", "--train.steps", "10", "--train.batch_pools", "4",
            "--log.output_dir", str(out), "--log.progress", "false"]  # fmt: skip
    assert train_head(args) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["teacher"]["kind"] == "step_aware" and written["sampling"]["lookahead_steps"] == 1
    assert written["sampling"]["num_candidates"] == (2 if preset == "sdxl" else 4)
    report = json.loads((out / "report.json").read_text())
    assert report["heldout"]["overall"]["teacher_valid"] > 0
    assert 0.0 <= report["heldout"]["overall"]["agree_valid"] <= 1.0
    data = torch.load(out / "data_train.pt", weights_only=False)
    assert torch.isfinite(data["grad"]).all() and data["grad"].abs().max() > 0
    # no held-out pair the teacher calls valid (few pools, a high threshold): the report is written all the same
    report["heldout"]["overall"]["agree_valid"] = None
    assert write_head_report(report, tmp_path / "none.png").is_file()
    head = load_head(out / "head.pt")
    assert head.distillation["lookahead_steps"] == 1 and head.distillation["teacher"] == "step_aware"
    assert head.config.latent_channels == comps.unet.config.in_channels
    assert head.config.text_dim == cond.embeds.shape[-1]

    for extra in (["--preference.verify_head", "true"],
                  ["--preference.head_refresh", "2", "--preference.head_max_timestep", "200"]):  # fmt: skip
        run = tmp_path / f"spo_{extra[0].split('_')[-1]}"
        spo = [*_args(w, preset, run), "--preference.head", str(out / "head.pt"), *extra]
        caplog.clear()
        assert main(spo) == 0
        assert "lookahead" not in caplog.text  # distilled on the run's own x0 estimate: nothing to warn about
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["pairs"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # a run judging another x0 estimate than the head learned: one warning naming the fix
    caplog.clear()
    other = [*_args(w, preset, tmp_path / "spo_la2"), "--preference.head", str(out / "head.pt"),
             "--sampling.lookahead_steps", "2", "--train.iterations", "1"]  # fmt: skip
    assert main(other) == 0
    assert "after 1 lookahead jump(s)" in caplog.text and "--sampling.lookahead_steps 2" in caplog.text
