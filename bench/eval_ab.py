"""Evaluation A/B on the same weights, in one process: each artifact is loaded into one model that
compiles once, scored plain (the quantized stage, on the whole validation set), then every variant
of the evaluation settings runs LoRA TTT on it in turn. No training noise between the variants,
so one artifact per seed decides an evaluation setting.

    DATA_DIR=... python3 bench/eval_ab.py --artifact a.pgq --artifact b.pgq [--docs 400] \
        base= nophase=LORA_TTT_PHASES=0 beta2=NGRAM_TILT_BETA=2,NGRAM_TILT_MIN_SHARE=0.9

The model's settings come from the artifacts' headers (as with EVAL_ONLY; the artifacts must be
of one model). A variant is NAME=KEY=VALUE,KEY=VALUE (a value may hold commas:
LORA_TTT_TARGETS=q,v,o) over the environment's settings (empty: those alone); only the
evaluation's settings (the `# evaluation` group of Hyperparameters) may change, since the
weights are fixed. --docs N evaluates LoRA TTT on the validation set's first N documents, and
--max-doc-targets M on those of at most M targets, for settings that do not depend on the whole
set; the plain score stays on the whole set. A document's chunks run one after another, so the
longest document is a floor on LoRA TTT's time: a prefix alone saves little (300 of the dev
set's 971 documents took 154 s against 156 s for all, H100) unless long documents are left out.
A variant that changes a compiled shape (LoRA TTT's rank, targets, batch, chunk or window)
compiles its graphs in its warm-up, and the table says so; the warm-up's step time feeds the
time plan as in train_gpt.py.

Per artifact, a table: each variant's LoRA TTT val_bpb and its difference from the first, the
same untilted, LoRA TTT's seconds and the warm-up's; at the end, each variant's differences per
artifact and their mean. --json FILE writes every figure. The sliding diagnostic and score-first
TTT are left out (bench/ab.py --eval-only runs the whole evaluation, one process per variant).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import quant_ab  # noqa: E402  (its variant syntax)
import train_gpt as tg  # noqa: E402

SHAPE_FIELDS = ("lora_ttt_rank", "lora_ttt_targets", "lora_ttt_batch_docs", "lora_ttt_chunk_tokens", "lora_ttt_long_chunk_tokens", "lora_ttt_seq_len", "eval_seq_len")


def evaluation_fields() -> set[str]:
    """The names (upper case) of the settings a variant may change: the `# evaluation` group."""
    _, sections = tg.hyperparameter_comments()
    return {name.upper() for name, section in sections.items() if section == "evaluation"}


def parse_variant(text: str, h: tg.Hyperparameters, allowed: set[str]) -> tuple[str, tg.Hyperparameters]:
    """quant_ab's variant syntax, only evaluation settings, checked as train_gpt.py checks them."""
    name, hv = quant_ab.parse_variant(text, h, "eval_ab.py", allowed)
    try:
        hv.check_ranges()
        hv.validate(1)
    except ValueError as err:
        raise SystemExit(f"eval_ab.py: {name}: {err}") from None
    return name, hv


def select_documents(tokens: torch.Tensor, target_bytes: torch.Tensor, count: int | None, max_targets: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream's first `count` documents (None: all) of at most `max_targets` targets (None:
    any length), concatenated in stream order, with their targets' bytes. Each keeps its targets
    as document_spans cuts them: up to and including the BOS that starts the next document (which
    then starts the next one kept), or the stream's last token."""
    spans = tg.document_spans(tokens)
    kept = [(f, e) for f, e in spans if max_targets is None or e - f <= max_targets][:count]
    if kept == spans:
        return tokens, target_bytes
    stream = torch.cat([tokens[kept[0][0] : kept[0][0] + 1]] + [tokens[f + 1 : e + 1] for f, e in kept])
    return stream, torch.cat([target_bytes[f:e] for f, e in kept])


def window_blind(variants: list[tuple[str, "tg.Hyperparameters"]], longest_targets: int) -> list[str]:
    """The variants whose LoRA TTT window differs from the first's while no selected document is
    longer than either window: every chunk then sees its whole prefix in both, so such a variant
    measures only another compiled shape, not the window."""
    first = variants[0][1].lora_ttt_window()
    return [name for name, hv in variants[1:] if hv.lora_ttt_window() != first and longest_targets <= min(first, hv.lora_ttt_window())]


def model_settings(h: "tg.Hyperparameters", variants: list[tuple[str, "tg.Hyperparameters"]]) -> "tg.Hyperparameters":
    """The settings the one model is built with: h with the longest LoRA TTT window of any variant,
    so that RoPE's tables cover every window as that variant's own run builds them. (A window past
    the tables gets NTK-rescaled angles at every position: another model.) Positions both cover
    have the same angles, so the other variants score as they would alone. A variant whose own run
    goes past its own tables (EVAL_SEQ_LEN beyond them: rescaled angles) but not past these
    would score another model here: refused."""
    built = dataclasses.replace(h, lora_ttt_seq_len=max(hv.lora_ttt_seq_len for _, hv in variants))
    for name, hv in [("the artifact's settings", h), *variants]:
        longest = max(hv.eval_seq_len, hv.lora_ttt_window())
        if hv.longest_sequence() < longest <= built.longest_sequence():
            raise SystemExit(f"eval_ab.py: {name}: its run rescales RoPE past {hv.longest_sequence()} positions (EVAL_SEQ_LEN={hv.eval_seq_len}), which this process's model, built for {built.longest_sequence()}, would not: evaluate it without the longer LORA_TTT_SEQ_LEN variants")
    return built


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--artifact", action="append", required=True, help="an artifact to evaluate (repeat for several seeds)")
    parser.add_argument("--docs", type=int, default=None, help="LoRA TTT on the first N documents only")
    parser.add_argument("--max-doc-targets", type=int, default=None, help="LoRA TTT only on documents of at most this many targets")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--quiet", action="store_true", help="leave out LoRA TTT's own log lines")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args(argv)
    for flag, value in (("--docs", args.docs), ("--max-doc-targets", args.max_doc_targets)):
        if value is not None and value < 1:
            raise SystemExit(f"eval_ab.py: {flag} must be >= 1")
    h = tg.Hyperparameters.from_env()
    try:  # the model is the artifacts', as with EVAL_ONLY: their settings replace the defaults
        checked = [tg.check_artifact(Path(path), h) for path in args.artifact]  # each decoded once, here
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"eval_ab.py: {err}") from None
    if any(decoded is None for _, decoded in checked):
        raise SystemExit(f"eval_ab.py: {args.artifact[[d for _, d in checked].index(None)]}: at or over the {tg.ARTIFACT_LIMIT_BYTES:,}-byte limit")
    h = checked[0][0]
    for path, (other, _) in zip(args.artifact[1:], checked[1:]):
        if other != h:
            raise SystemExit(f"eval_ab.py: {path}: another model than {args.artifact[0]}'s (one process builds one model)")
    h.validate(1)
    allowed = evaluation_fields()
    variants = [parse_variant(v, h, allowed) for v in args.variants]
    if len({name for name, _ in variants}) != len(variants):
        raise SystemExit("eval_ab.py: two variants share a name")
    rt = tg.init_runtime()
    log = None if args.quiet or not rt.is_main else (lambda msg: print(msg, flush=True))

    sp = tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size)
    val_files = tg.find_shards(h, "val")
    val = tg.load_validation_tokens(val_files, h.eval_seq_len, h.vocab_size)
    target_bytes = tg.validation_target_bytes(val, tg.build_byte_tables(sp), tg.load_validation_byte_sidecars(val_files, len(val)))
    ttt_val, ttt_bytes = select_documents(val, target_bytes, args.docs, args.max_doc_targets)
    say = print if rt.is_main else (lambda *a, **k: None)
    ttt_spans = tg.document_spans(ttt_val)
    say(f"validation: {len(tg.document_spans(val)):,} documents, {len(val) - 1:,} targets; LoRA TTT on {len(ttt_spans):,} documents, {len(ttt_val) - 1:,} targets, {int(ttt_bytes.sum()):,} bytes", flush=True)

    longest = max(e - f for f, e in ttt_spans)
    for name in window_blind(variants, longest):
        say(f"note: {name}: no selected document has more than {longest:,} targets, within both windows: the variant measures only another compiled shape (drop --max-doc-targets to test a window)", flush=True)

    model = tg.build_model(model_settings(h, variants), rt, tg.Logger(None))
    results: dict[str, dict[str, dict]] = {}
    for path, (_, decoded) in zip(args.artifact, checked):
        t0 = time.perf_counter()
        model = model.using(looping=decoded.looping)
        model.load_state_dict(decoded.state)
        tg.warm_up_windows(model, h, rt.device)
        plain = tg.evaluate(model, val, target_bytes, tg.Windows(h.eval_seq_len, None, h.eval_batch_seqs), rt)
        say(f"\n{path}: quantized val_bpb {plain.bpb:.5f} (whole set; load and compile {time.perf_counter() - t0:.0f}s)", flush=True)
        say(f"{'variant':14s} {'lora_ttt':>9s} {'vs first':>9s} {'untilted':>9s} {'vs first':>9s} {'seconds':>8s} {'warm-up':>8s}", flush=True)
        rows, compiled = {}, set()
        for name, hv in variants:
            shape = tuple(getattr(hv, f) for f in SHAPE_FIELDS)
            t_warm = time.perf_counter()
            step_seconds = tg.warm_up_lora_ttt(model, hv, rt.device)
            warm = time.perf_counter() - t_warm
            r = tg.evaluate_lora_ttt(model, ttt_val, ttt_bytes, hv, rt, log=log, step_seconds=step_seconds)
            untilted = r.untilted_bpb if r.untilted_nll_sum is not None else r.bpb
            rows[name] = dict(lora_ttt=r.bpb, untilted=untilted, seconds=r.seconds, warm_up=warm, step_seconds=step_seconds, quantized=plain.bpb, compiled=shape not in compiled)
            first = next(iter(rows.values()))
            note = "  (compiles)" if shape not in compiled and compiled else ""
            compiled.add(shape)
            say(f"{name:14s} {r.bpb:9.5f} {r.bpb - first['lora_ttt']:+9.5f} {untilted:9.5f} {untilted - first['untilted']:+9.5f} {r.seconds:8.1f} {warm:8.1f}{note}", flush=True)
        results[path] = rows

    say("\nper variant, the difference from the first (LoRA TTT val_bpb; untilted), per artifact and mean", flush=True)
    base = variants[0][0]
    for name, _ in variants[1:]:
        d = [rows[name]["lora_ttt"] - rows[base]["lora_ttt"] for rows in results.values()]
        u = [rows[name]["untilted"] - rows[base]["untilted"] for rows in results.values()]
        say(f"  {name:14s} mean {statistics.mean(d):+.5f} per artifact [{', '.join(f'{x:+.5f}' for x in d)}]; untilted mean {statistics.mean(u):+.5f} [{', '.join(f'{x:+.5f}' for x in u)}]", flush=True)
    if args.json is not None and rt.is_main:
        args.json.write_text(json.dumps(dict(docs=args.docs, max_doc_targets=args.max_doc_targets, variants=args.variants, results=results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
