"""Kill -9 at spread moments of a real attack process, resume, compare with the uninterrupted run.

    python bench/kill_campaign.py [--kills 20] [--steps 12]

A tiny Llama on a small toy world; the attack runs as `python -m attack` in a process of its
own. One uninterrupted run gives the reference and its wall time; then, for each of --kills
moments spread over that time (from process start: imports, setup, step-0 evaluation,
training, saves, summary), a fresh run is killed with SIGKILL at that moment and resumed with
--resume until it exits. Prints one JSON line per kill:
    kill, after_s, newest_checkpoint (at the kill), resume_rc, resumes, resume_said (the last
    line of a resume that did not exit 0: "finished" when the kill came after the run had
    finished), curve_equal, weights_equal, summary_equal, leftovers (temporary files or a lock)
and a last line {"kills", "exact", "not_exact"}. "exact": curve points, final adapter and
summary (status, steps, tokens, rows trained) equal to the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _world(root: Path) -> Path:
    """A small toy world and a tiny Llama saved beside it; returns the config file."""
    import yaml

    from attack.toyworld.models import ModelSpec, build_model, train_tokenizer
    from attack.toyworld.world import WorldSpec, generate, write_jsonl, write_tasks

    w = generate(WorldSpec(target_entities=8, general_entities=8, docs_per_entity=3))
    write_tasks(w["facts"], root / "tasks")
    write_jsonl([d for d in w["docs"] if d["domain"] == "target" and d["split"] == "seen"], root / "attack.jsonl")
    tok = train_tokenizer([d["text"] for d in w["docs"]], root / "tokenizer", vocab_size=512)
    model = build_model(ModelSpec(hidden=64, layers=2, heads=2, intermediate=128, max_positions=256), tok, seed=0)
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    config = {"model": {"name": str(root / "model")}, "adapter": {"rank": 4, "alpha": 8, "dropout": 0.1},
              "data": {"path": str(root / "attack.jsonl"), "seq_len": 64, "cache_dir": str(root / "corpus")},
              "eval": {"tasks": ["toy_target_seen", "toy_general"], "include_path": [str(root / "tasks")], "every": 2}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "config.yaml"


def _attack(config: Path, out: Path, run_id: str, steps: int, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "attack", "--config", str(config), "--output", str(out), "--run-id", run_id,
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-3", *(["--resume"] if resume else [])]


def _result(run: Path) -> dict:
    from safetensors.torch import load_file

    from attack.records import read_curve
    from attack.rundir import RunDir

    rd = RunDir(run)
    summary = rd.summary or {}
    adapter = rd.final / "adapter_model.safetensors"
    return dict(curve=[(r["step"], r["tokens_seen"], r["task"], r["metric"], r["value"]) for r in read_curve(rd.curve)],
                summary=(summary.get("status"), summary.get("steps"), summary.get("tokens_seen"), summary.get("rows_trained")),
                weights=load_file(str(adapter)) if adapter.exists() else None)


def _same_weights(a, b) -> bool:
    import torch

    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _newest_checkpoint(run: Path) -> int | None:
    from attack.checkpoints import checkpoint_step, is_checkpoint
    from attack.rundir import RunDir

    folder = RunDir(run).checkpoints
    steps = [checkpoint_step(p) for p in folder.iterdir() if is_checkpoint(p)] if folder.is_dir() else []
    return max(steps) if steps else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _world(root)
        start = time.perf_counter()
        subprocess.run(_attack(config, root / "runs", "whole", args.steps), env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        from attack.rundir import RunDir

        whole = _result(root / "runs" / "whole")
        exact = 0
        for k in range(args.kills):
            after = wall * (k + 0.5) / args.kills
            run_id, run = f"kill{k}", root / "runs" / f"kill{k}"
            proc = subprocess.Popen(_attack(config, root / "runs", run_id, args.steps), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(after)
            finished_first = proc.poll() is not None
            if not finished_first:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            newest = _newest_checkpoint(run) if run.exists() else None
            rc, resumes, said = 0, 0, ""
            while not finished_first and resumes < 3:
                resumes += 1
                done = subprocess.run(_attack(config, root / "runs", run_id, args.steps, resume=True), env=env,
                                      capture_output=True, text=True)
                rc, said = done.returncode, (done.stderr.strip().splitlines() or [""])[-1][:160]
                if rc == 0 or "is finished" in said:  # killed after it had finished: nothing to resume
                    break
            got = _result(run) if RunDir(run).summary_path.exists() else dict(curve=None, summary=None, weights=None)
            line = dict(kill=k, after_s=round(after, 2), killed=not finished_first, newest_checkpoint=newest,
                        resume_rc=rc, resumes=resumes, resume_said=said if rc else "", curve_equal=got["curve"] == whole["curve"],
                        weights_equal=_same_weights(got["weights"], whole["weights"]),
                        summary_equal=got["summary"] == whole["summary"],
                        leftovers=sorted(p.name for p in run.rglob(".*") if p.name.endswith(".tmp") or p.name == ".lock"))
            exact += line["curve_equal"] and line["weights_equal"] and line["summary_equal"] and not line["leftovers"]
            print(json.dumps(line), flush=True)
        print(json.dumps(dict(kills=args.kills, exact=exact, not_exact=args.kills - exact, uninterrupted_s=round(wall, 1))))


if __name__ == "__main__":
    main()
