"""Hyperparameters: defaults, environment overrides, and every rejection names its variable."""

import dataclasses
import os
import re

import pytest

import train_gpt as tg


def test_defaults_match_the_record():
    h = tg.Hyperparameters.from_env({})
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult, h.vocab_size) == (11, 512, 8, 4, 4, 8192)
    assert (h.rope_dims, h.logit_softcap, h.parallel_from_layer) == (16, 30.0, 7)
    assert (h.loop_start, h.loop_end, h.num_loops, h.loop_start_frac) == (3, 5, 2, 0.35)
    assert (h.muon_momentum, h.muon_wd, h.embed_lr, h.scalar_lr) == (0.97, 0.095, 0.03, 0.02)
    assert (h.train_batch_tokens, h.train_seq_len, h.grad_clip_norm, h.ema_decay) == (786432, 2048, 0.3, 0.9965)
    assert (h.eval_seq_len, h.eval_stride, h.ttt_chunk_tokens, h.ttt_lr, h.ttt_epochs) == (2048, 64, 32768, 0.005, 3)
    assert (h.matrix_bits, h.matrix_clip_k, h.embed_bits, h.embed_clip_k) == (6, 12.85, 8, 20.0)
    # past the record, the defaults that won their A/B (README): Polar Express, SmearGate
    assert (h.muon_ns_coefficients, h.smear_gate) == ("polar_express", True)
    # overturned by the B2-horizon A/B (EXPERIMENTS.md, "Training defaults at the B2 horizon"): #2135 has 5.0, 0.028, on at 0.5, 0.99, 0.85
    assert (h.qk_gain_init, h.muon_lr, h.attn_gate, h.attn_gate_scale, h.adam_beta2, h.warmdown_frac) == (5.25, 0.026, False, 1.0, 0.95, 0.72)
    # the accepted rows' settings (#2135; EXPERIMENTS.md, parity table), kept unless a B2-horizon A/B overturns one
    assert (h.gptq_calib_seqs, h.lqer_group, h.lora_ttt_lr, h.lora_ttt_wd, h.lora_ttt_targets, h.lora_ttt_phases) == (32, 32, 8e-5, 2.0, "q,v,o,mlp,head", 1)
    assert (h.ngram_tilt_order, h.ngram_tilt_min_share, h.ngram_tilt_beta) == (15, 0.8, 2.625)
    h.validate(world_size=8)
    assert h.accum_steps(8) == 1 and h.accum_steps(1) == 8 and h.accum_steps(2) == 4


def _non_default_value(f, default):
    """A value other than the default that the field's range admits, as its env string."""
    meta = f.metadata
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != default)
    if isinstance(default, bool):
        return "0" if default else "1"
    if isinstance(default, (int, float)):
        hi, lo = meta.get("hi"), meta.get("lo")
        if hi is None or default + 1 <= hi:
            value = default + 1
        elif isinstance(default, float):
            value = (default + hi) / 2 if default < hi else (default + lo) / 2
        else:
            value = default - 1
        assert value != default and (lo is None or value >= lo)
        return str(value)
    return "override"


def test_every_field_is_overridable_by_its_upper_case_name():
    defaults = tg.Hyperparameters()
    env = {f.name.upper(): _non_default_value(f, getattr(defaults, f.name)) for f in dataclasses.fields(tg.Hyperparameters)}
    h = tg.Hyperparameters.from_env(env)
    for f in dataclasses.fields(h):
        value = getattr(h, f.name)
        assert value != getattr(defaults, f.name), f.name  # the override took effect
        assert value == tg._parse_value(f.name.upper(), env[f.name.upper()], f.type), f.name


def test_overrides_are_typed():
    h = tg.Hyperparameters.from_env({"NUM_LAYERS": "9", "MUON_LR": "0.05", "COMPILE": "false", "RUN_ID": "abc", "EVAL_ONLY": "1"})
    assert h.num_layers == 9 and isinstance(h.num_layers, int)
    assert h.muon_lr == 0.05 and h.compile is False and h.run_id == "abc" and h.eval_only is True


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven': expected an integer"),
        ({"NUM_LAYERS": "1.5"}, "NUM_LAYERS='1.5': expected an integer"),
        ({"MUON_LR": "fast"}, "MUON_LR='fast': expected a number"),
        ({"MUON_LR": "nan"}, "MUON_LR='nan': must be finite"),
        ({"MUON_LR": "-0.1"}, "MUON_LR=-0.1: must be >= 0"),
        ({"NUM_LAYERS": "0"}, "NUM_LAYERS=0: must be >= 1"),
        ({"MAX_WALLCLOCK_SECONDS": "0"}, "MAX_WALLCLOCK_SECONDS=0.0: must be > 0"),
        ({"MUON_MOMENTUM": "1.5"}, "MUON_MOMENTUM=1.5: must be <= 0.9999"),
        ({"LOOP_START_FRAC": "2"}, "LOOP_START_FRAC=2.0: must be <= 1"),
        ({"MATRIX_BITS": "9"}, "MATRIX_BITS=9: must be <= 8"),
        ({"COMPILE": "maybe"}, "COMPILE='maybe': expected a boolean"),
        ({"COMPRESSOR": "gzip"}, "COMPRESSOR='gzip': must be one of brotli, lzma"),
        ({"ATTENTION_BACKEND": "xformers"}, "ATTENTION_BACKEND='xformers': must be one of"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("+", r"\+")):
        tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize(
    "env, world_size, message",
    [
        ({}, 3, "WORLD_SIZE=3: must divide 8"),
        ({}, 16, "WORLD_SIZE=16: must divide 8"),
        ({"NUM_HEADS": "7"}, 1, "NUM_HEADS=7: must divide MODEL_DIM=512"),
        ({"NUM_KV_HEADS": "3"}, 1, "NUM_KV_HEADS=3: must divide NUM_HEADS=8"),
        ({"ROPE_DIMS": "15"}, 1, "ROPE_DIMS=15: must be even"),
        ({"ROPE_DIMS": "66"}, 1, "ROPE_DIMS=66: must be even and <= head dim 64"),
        ({"LOOP_START": "6", "LOOP_END": "5"}, 1, "LOOP_START=6, LOOP_END=5"),
        ({"LOOP_END": "11"}, 1, "LOOP_END=11: need"),
        ({"PARALLEL_FROM_LAYER": "12"}, 1, "PARALLEL_FROM_LAYER=12"),
        ({"ARTIFACT_TARGET_BYTES": "16000000"}, 1, "ARTIFACT_TARGET_BYTES=16000000: must be < the 16,000,000-byte limit"),
        ({"GPTQ_RESERVE_SECONDS": "700"}, 1, "GPTQ_RESERVE_SECONDS=700.0: must be < MAX_WALLCLOCK_SECONDS"),
        ({"TRAIN_BATCH_TOKENS": "786000"}, 1, "TRAIN_BATCH_TOKENS=786000: must be a multiple of"),
        ({"GRAD_ACCUM_STEPS": "5"}, 1, "TRAIN_BATCH_TOKENS=786432: must be a multiple of world size 1 x GRAD_ACCUM_STEPS 5"),
        ({"EVAL_STRIDE": "100"}, 1, "EVAL_STRIDE=100: must divide EVAL_SEQ_LEN=2048"),
        ({"TTT_CHUNK_TOKENS": "3000"}, 1, "TTT_CHUNK_TOKENS=3000: must be a multiple of EVAL_SEQ_LEN"),
        ({"TTT_BATCH_SEQS": "3"}, 1, "TTT_BATCH_SEQS=3: must divide the 16 sequences"),
        ({"TTT_BATCH_SEQS": "4"}, 8, "TTT_BATCH_SEQS=4: must be a multiple of world size 8"),
        ({"ATTENTION_BACKEND": "fa3"}, 1, "ATTENTION_BACKEND=fa3: flash_attn_interface is not importable"),
    ],
)
def test_incompatible_combinations_name_the_variable(env, world_size, message):
    if "fa3" in message and tg.flash_attn_3 is not None:
        pytest.skip("flash_attn_interface is installed here")
    h = tg.Hyperparameters.from_env(env)
    with pytest.raises(ValueError, match=re.escape(message)):
        h.validate(world_size)


@pytest.mark.parametrize(
    "name, message",
    [
        ("MAX_WALLCLOK_SECONDS", "MAX_WALLCLOK_SECONDS: not a hyperparameter; did you mean MAX_WALLCLOCK_SECONDS?"),
        ("EMA_DECAYY", "did you mean EMA_DECAY?"),
        ("WARMDOWN_FRACTION", "did you mean WARMDOWN_FRAC?"),
        ("max_wallclock_seconds", "max_wallclock_seconds: hyperparameter variables are upper case; did you mean MAX_WALLCLOCK_SECONDS?"),
        ("ITERS", "ITERS: not a hyperparameter; did you mean ITERATIONS?"),  # an abbreviation
        ("WARMDOWN", "did you mean WARMDOWN_FRAC?"),  # a prefix
        ("LORA_RANK", "did you mean LORA_TTT_RANK?"),
        ("QK_GAIN", "did you mean QK_GAIN_INIT?"),
    ],
)
def test_misspelled_variable_is_refused(name, message):
    with pytest.raises(ValueError, match=message):
        tg.Hyperparameters.from_env({name: "5"})


def test_unrelated_environment_variables_pass():
    launcher = "PATH HOME CUDA_VISIBLE_DEVICES NCCL_DEBUG OMP_NUM_THREADS MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK TORCHELASTIC_RUN_ID TORCHINDUCTOR_CACHE_DIR PYTHONPATH LD_LIBRARY_PATH MAX_JOBS TRITON_CACHE_DIR PYTHONUNBUFFERED"
    shell = "USER SHELL TERM LANG PWD OLDPWD SHLVL HOSTNAME LOGNAME MAIL EDITOR PAGER DISPLAY TMPDIR TZ COLUMNS LINES LS_COLORS PS1 SSH_AUTH_SOCK SUDO_USER CI GITHUB_ACTIONS HF_HOME HF_TOKEN WANDB_API_KEY CUDA_HOME SLURM_JOB_ID SLURM_PROCID VIRTUAL_ENV NODE_RANK OUT TOKENIZERS_PARALLELISM"
    tg.Hyperparameters.from_env(dict.fromkeys(launcher.split() + shell.split(), "1"))
    tg.Hyperparameters.from_env(dict(os.environ))  # this machine's own


@pytest.mark.parametrize("run_id", ["../../x", "a/b", "..", "c:\\x"])
def test_run_id_must_be_a_plain_file_name(run_id):
    with pytest.raises(ValueError, match="RUN_ID=.*: must be a plain file name, without directories"):
        tg.Hyperparameters.from_env({"RUN_ID": run_id})


def test_world_size_two_with_same_global_batch_is_valid():
    h = tg.Hyperparameters.from_env({})
    h.validate(2)
    assert h.train_batch_tokens // (2 * h.accum_steps(2) * h.train_seq_len) == 48


def hyperparameter_group_rows() -> str:
    """The README's table of settings by group, in the order of Hyperparameters."""
    _, sections = tg.hyperparameter_comments()
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(tg.Hyperparameters):
        groups.setdefault(sections[f.name], []).append(f"`{f.name.upper()}`")
    return "\n".join(f"| {group} | {', '.join(names)} |" for group, names in groups.items())


def test_readme_documents_every_hyperparameter():
    """The README's group table is the one generated from Hyperparameters (a new or renamed
    setting fails here until the table is regenerated: the message holds the new rows)."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    rows = hyperparameter_group_rows()
    assert f"| group | settings |\n| --- | --- |\n{rows}\n<!-- end of hyperparameter groups -->" in readme, rows
    missing = [f.name.upper() for f in dataclasses.fields(tg.Hyperparameters) if f"`{f.name.upper()}`" not in readme]
    assert not missing, missing


def test_ci_runs_the_readme_test_command_last():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    last = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert last == "python3 -m pytest -q tests" and f"```bash\n{last}\n```" in readme


def test_readme_quick_run_writes_data_and_valid_settings(tmp_path, monkeypatch):
    """The README's CPU quick run: tests/tiny_data.py writes a DATA_DIR and an env file whose
    settings the script accepts (test_smoke runs the same settings end to end)."""
    import runpy

    from conftest import ROOT

    assert "python3 tests/tiny_data.py /tmp/tiny && env $(cat /tmp/tiny/quick_run.env) python3 train_gpt.py" in (ROOT / "README.md").read_text()
    monkeypatch.setattr("sys.argv", ["tiny_data.py", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "tests" / "tiny_data.py"), run_name="__main__")
    assert done.value.code == 0
    env = dict(item.split("=", 1) for item in (tmp_path / "quick_run.env").read_text().split())
    h = tg.Hyperparameters.from_env(env)
    h.validate(1)
    assert h.data_dir == str(tmp_path) and len(tg.find_shards(h, "train")) == 2
    tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size)


def test_tiny_data_explains_itself_and_refuses_options(tmp_path, monkeypatch, capsys):
    """--help prints the usage and writes nothing; an unknown option is refused in one line
    (never taken for the output folder)."""
    import tiny_data

    monkeypatch.chdir(tmp_path)
    assert tiny_data.main(["--help"]) == 0 and "usage: python3 tests/tiny_data.py OUTPUT_DIR" in capsys.readouterr().out
    for argv in (["--bogus"], [], ["a", "b"]):
        assert tiny_data.main(argv) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_section_map_matches_the_section_banners():
    """The module docstring's numbered map names the file's section banners, in order."""
    import re

    from conftest import ROOT

    source = (ROOT / "train_gpt.py").read_text()
    mapped = re.findall(r"^ {3,4}(\d+)\. (\w+) ", tg.__doc__, re.M)
    banners = re.findall(r"^# -{90,}\n# (\d+)\. (\w+)", source, re.M)
    assert [(n, name.lower()) for n, name in banners] == mapped and len(mapped) == 10


def test_the_readable_file_stays_under_3500_lines():
    from conftest import ROOT

    lines = len((ROOT / "train_gpt.py").read_text().splitlines())
    assert lines <= 3500, f"train_gpt.py has {lines} lines: move experiments out, or split what grew"
