"""`cai run RECIPE`: run a recipe's stages in order, each into `<output_dir>/<stage>/`.

A stage is skipped when it finished before with the same fingerprint: its own section of the
recipe, the settings shared by every stage (model, constitution, seed, engine), the content of
every file those name (an edited principle, prompt file or template reruns the stages that read
it), and the fingerprints of the stages before it (a changed upstream stage reruns everything after it). Each
finished stage writes `done.json` with its fingerprint, wall time and summary; generating stages
also resume mid-way from their own work logs, training stages from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from cai import digests, hub, progress, store
from cai.engines.starts import engine_starts
from cai.errors import CaiError
from cai.recipe import ITERATED_STAGES, POLICY_STAGES, PromptSource, Recipe, resolve_path, step_name


def _recorded_fingerprint(marker: Path) -> str | None:
    """The fingerprint a stage's `done.json`/`stage.json` recorded; None when absent or unreadable."""
    try:
        return json.loads(marker.read_text())["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _load_prompt_sources(sources: list[PromptSource], what: str):
    from cai.prompt_sets import load_prompts

    if not sources:
        raise CaiError("needs at least one prompt source", field=f"{what}.prompts")
    prompts = []
    for source in sources:
        prompts += load_prompts(resolve_path(source.path), columns=source.columns, limit=source.limit)
    return prompts


def engine_fingerprint(engine) -> dict:
    """The engine settings a stage's output depends on: the `openai` and `ray` sections count only
    when they are the engine's kind, so a setting (or a new field) of an engine the recipe does not
    use never reruns finished stages."""
    values = dataclasses.asdict(engine)
    for kind in ("openai", "ray"):
        if engine.kind != kind:
            values.pop(kind)
    return values


class RecipeRunner:
    def __init__(self, recipe: Recipe, *, log: Callable[[str], None] = print):
        self.recipe = recipe
        self.out = recipe.out
        self.log = log
        self._fingerprints: dict[str, str] = {}
        self._shared: dict | None = None
        self.iteration = 1  # the iteration whose steps the stage methods run (see `plan`)

    # -- bookkeeping --------------------------------------------------------------------------------
    def fingerprint(self, stage: str, iteration: int | None = None) -> str:
        """What the stage's output depends on: its section, the shared settings, the *content* of
        every file they name (constitution, prompt files, templates, blend sources: see
        `cai.digests`), the fingerprints of the steps before it and, past the first, its iteration."""
        r = self.recipe
        iteration = self.iteration if iteration is None else iteration
        shared = {"model": r.model, "constitution": r.constitution, "seed": r.seed, "engine": engine_fingerprint(r.engine),
                  "contents": self._shared_contents()}
        steps = self.plan()
        here = steps.index((iteration, stage))
        upstream = [self._fingerprints[step_name(*s)] for s in steps[:here] if step_name(*s) in self._fingerprints]
        section = dataclasses.asdict(getattr(r, stage))
        parts = (stage, shared, section, upstream, digests.input_digests(section, resolve_path))
        return store.stable_id(*parts, {"iteration": iteration}) if iteration > 1 else store.stable_id(*parts)

    def plan(self) -> list[tuple[int, str]]:
        """(iteration, stage) in run order: every stage once, then the iterated ones again per
        iteration (`Recipe.iterations`)."""
        steps = [(1, s) for s in self.recipe.stages]
        for iteration in range(2, self.recipe.iterations + 1):
            steps += [(iteration, s) for s in self.recipe.stages if s in ITERATED_STAGES]
        return steps

    def _shared_contents(self) -> dict:
        """Content of the inputs every stage shares: the constitution's validated content (its
        hash, as records carry it; comments and formatting do not count), the shipped prompt
        templates, and the model folder when the model is a local one."""
        if self._shared is None:
            from cai.prompts import PromptSet

            self._shared = {"constitution": self.constitution().hash, "templates": PromptSet().hash(),
                            "model": digests.input_digests(self.recipe.model, resolve_path)}
        return self._shared

    def stage_dir(self, stage: str, iteration: int | None = None) -> Path:
        iteration = self.iteration if iteration is None else iteration
        return self.out / step_name(iteration, stage) if stage in ITERATED_STAGES else self.out / stage

    def is_done(self, stage: str) -> bool:
        return _recorded_fingerprint(self.stage_dir(stage) / "done.json") == self.fingerprint(stage)

    def run(self, *, from_stage: str | None = None, only: str | None = None) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        with store.RunLock(self.out):
            # run.log: the runner's lines and every stage's progress, as plain timestamped lines
            # (`tail -f <output_dir>/run.log`), whether or not stderr is a terminal.
            progress.set_log_file(self.out / "run.log")
            shown = self.log

            def log(text: str) -> None:
                progress.log_line(text)
                shown(text)

            self.log = log
            try:
                return self._run(from_stage, only)
            finally:
                self.log = shown
                progress.set_log_file(None)

    def _walk(self, from_stage: str | None, only: str | None):
        """Each step in order as (name, stage, fingerprint, action, why), with `self.iteration`
        set to the step's: action is "run", "skip" (unchanged) or "leave" (not selected)."""
        steps = self.plan()
        names = [step_name(*step) for step in steps]
        for option, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in names and value not in self.recipe.stages:
                raise CaiError(f"stage '{value}' is not in this recipe ({', '.join(names)})", field=option)
        # A bare stage name picks that stage in every iteration (--only) or its first run (--from).
        start_index = next(i for i, (it, s) in enumerate(steps) if from_stage in (s, names[i])) if from_stage else 0
        for index, (iteration, stage) in enumerate(steps):
            self.iteration = iteration
            name = names[index]
            fingerprint = self.fingerprint(stage)
            self._fingerprints[name] = fingerprint
            if only is not None and only not in (stage, name):
                yield name, stage, fingerprint, "leave", f"not selected (--only {only})"
            elif index < start_index:
                yield name, stage, fingerprint, "leave", f"before --from {from_stage}"
            elif only is not None or index == start_index and from_stage is not None:
                yield name, stage, fingerprint, "run", "asked for by --only" if only is not None else "asked for by --from"
            elif self.is_done(stage):
                yield name, stage, fingerprint, "skip", "unchanged since its last run"
            else:
                yield name, stage, fingerprint, "run", self._why_run(stage, fingerprint)
        self.iteration = 1

    def _why_run(self, stage: str, fingerprint: str) -> str:
        folder = self.stage_dir(stage)
        if _recorded_fingerprint(folder / "done.json") is not None:
            return "settings, inputs or an upstream step changed since its last run"
        if _recorded_fingerprint(folder / "stage.json") == fingerprint:
            return "started before with these settings: resumes its partial work"
        return "never finished" if not store.entries(folder) else "partial work with other settings: starts afresh"

    def preview(self, *, from_stage: str | None = None, only: str | None = None) -> list[dict]:
        """What `run` would do, step by step and why, without running, writing or locking anything
        (`cai run --dry-run`)."""
        return [{"step": name, "action": action, "why": why, "folder": str(self.stage_dir(stage))}
                for name, stage, _, action, why in self._walk(from_stage, only)]

    def _run(self, from_stage: str | None, only: str | None) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        timings, names = {}, []
        for name, stage, fingerprint, action, why in self._walk(from_stage, only):
            names.append(name)
            if action == "leave":
                continue
            if action == "skip":
                self.log(f"[{name}] {why}: skipped")
                continue
            self.log(f"[{name}] running -> {self.stage_dir(stage)}")
            self._begin(stage, fingerprint)
            began, starts = time.perf_counter(), len(engine_starts)
            summary = getattr(self, f"_{stage}")()
            seconds = round(time.perf_counter() - began, 1)
            timings[name] = seconds
            # Engine start-ups (20-40 s each for vLLM on a CPU) are kept apart from the stage's work.
            started = round(sum(s["seconds"] for s in engine_starts[starts:]), 1)
            store.write_json_atomic(self.stage_dir(stage) / "done.json", {
                "fingerprint": fingerprint, "seconds": seconds, "engine_start_seconds": started, "summary": summary})
            self.log(f"[{name}] done in {seconds} s" + (f" ({started} s of it starting engines)" if started else ""))
        self.iteration = 1
        if "eval" in self.recipe.stages and (self.stage_dir("eval") / "metrics.json").exists():
            from cai.report import write_report

            write_report(self.out, names)
        hub.push_run(self, log=self.log)  # the recipe's `push:` section; nothing without push.repo_prefix
        return timings

    def _begin(self, stage: str, fingerprint: str) -> None:
        """Keep a stage folder's partial work (work logs, checkpoints) only for the same fingerprint.

        A stage rerun because its settings or an upstream stage changed must not resume from
        the old run's work: a DPO checkpoint made with another learning rate, or samples drawn
        from an SFT adapter since retrained at the same path, would be silently reused.
        Only a folder cai marked (stage.json, done.json or a run manifest) is cleared, and only
        of the names cai writes; a folder of someone else's files is refused untouched.
        """
        directory = self.stage_dir(stage)
        marker = directory / "stage.json"
        names = store.entries(directory)
        if names and _recorded_fingerprint(marker) != fingerprint:
            if not store.has_cai_marker(directory):
                raise CaiError(f"holds {store.name_list(names)} but no readable stage.json, so cai cannot tell it wrote "
                               "them: move them away or set another output_dir", source=str(directory))
            self.log(f"[{stage}] settings or inputs changed since the partial run in {directory}: starting it afresh")
            kept = store.clear_directory(directory, keep=("stage.json",))
            if kept:
                self.log(f"[{stage}] kept files cai did not write: {store.name_list(kept)}")
        store.make_dirs(directory)
        store.write_json_atomic(marker, {"fingerprint": fingerprint})

    # -- shared objects -------------------------------------------------------------------------------
    def engine(self, model: str | None = None, adapters: dict[str, str] | None = None):
        """The recipe's engine; work with LoRA adapters goes to `adapter_engine` (see Recipe)."""
        import torch

        from cai.engines import get_engine

        settings = dataclasses.replace(self.recipe.engine, threads=self.recipe.engine.threads or self.recipe.threads,
                                       trust_remote_code=self.recipe.trust_remote_code)
        choice = self.recipe.adapter_engine
        if choice == "auto":
            choice = "same" if torch.cuda.is_available() else "merge"
        if choice == "merge":
            # Every stage asks for the same engine, which swaps merged weights in for adapters.
            settings = dataclasses.replace(settings, merge_adapters=True)
        elif adapters and choice == "hf":
            settings = dataclasses.replace(settings, kind="hf")
        elif choice == "same" and any(s in self.recipe.stages for s in ("sft", *POLICY_STAGES)):
            # One engine serves base and adapters: start it with LoRA slots from the first stage on.
            settings = dataclasses.replace(settings, enable_lora=True)
        return get_engine(model or self.recipe.model, settings, adapters)

    def constitution(self):
        from cai.constitution import load_constitution

        return load_constitution(resolve_path(self.recipe.constitution))

    def adapter(self, stage: str, iteration: int | None = None) -> str | None:
        path = self.stage_dir(stage, iteration) / "adapter"
        return str(path) if stage in self.recipe.stages and path.is_dir() else None

    def start_adapter(self) -> tuple[str | None, str | None]:
        """(engine name, folder) of the policy an iteration starts from: the SFT adapter in the
        first, the previous iteration's trained policy after it (what sampling, the next policy
        stage's initialisation and its reference all use: iterative DPO, Xu et al. 2023)."""
        if self.iteration == 1:
            return "sft", self.adapter("sft")
        previous = self.adapter(self.policy_stage(), self.iteration - 1)
        if previous is None:
            raise CaiError(f"iteration {self.iteration} starts from iteration {self.iteration - 1}'s policy, which has no adapter",
                           source=str(self.stage_dir(self.policy_stage(), self.iteration - 1)))
        return f"policy-{self.iteration - 1}", previous

    def policy_stage(self) -> str | None:
        trained = [s for s in POLICY_STAGES if s in self.recipe.stages]
        return trained[-1] if trained else None

    # -- stages ---------------------------------------------------------------------------------------
    def _critique(self) -> dict:
        from cai.critique import CritiqueRun
        from cai.prompts import PromptSet

        section = self.recipe.critique
        settings = dataclasses.replace(section.settings, seed=self.recipe.seed)
        run = CritiqueRun(self.engine(), self.constitution(), _load_prompt_sources(section.prompts, "critique"),
                          PromptSet(section.prompt_dir), self.stage_dir("critique"), settings, overwrite=True)
        summary = dataclasses.asdict(run.run())
        summary.pop("stages")
        return summary

    def _sft(self) -> dict:
        settings = dataclasses.replace(self.recipe.sft.settings, threads=self.recipe.threads, seed=self.recipe.seed)
        return self._train("cai.train.policy:train_sft", data=self.stage_dir("critique") / "sft.jsonl", model_name=self.recipe.model,
                           out_dir=self.stage_dir("sft"), settings=settings)

    def _train(self, target: str, **kwargs) -> dict:
        """Call a training function (`module:name`) here, or once per process under torchrun or
        accelerate when the recipe's `distributed` section asks (cai/train/distributed.py)."""
        from cai.train.distributed import launch, resolve

        distributed = self.recipe.distributed
        if distributed.enabled:
            if distributed.accelerate_config:
                distributed = dataclasses.replace(distributed, accelerate_config=resolve_path(distributed.accelerate_config))
            metrics = launch(distributed, target, self.log, **kwargs)
        else:
            metrics = resolve(target)(**kwargs)
        return {k: v for k, v in metrics.items() if k not in ("log_history", "eval_history")}

    def _single_process(self, stage: str, why: str) -> None:
        if self.recipe.distributed.enabled:
            self.log(f"[{stage}] runs in this one process, not under the launcher: {why}")

    def _sample(self) -> dict:
        from cai.sampling import SampleSettings, run_sampling

        section = self.recipe.sample
        name, start = self.start_adapter()
        if self.iteration == 1 and not section.use_sft:
            name, start = None, None
        engine = self.engine(adapters={name: start} if start else None)
        # Each iteration draws new samples: another seed, and (past the first) the latest policy.
        settings = SampleSettings(k=section.k, seed=self.recipe.seed + self.iteration - 1, sampling=section.sampling)
        return run_sampling(engine, _load_prompt_sources(section.prompts, "sample"), self.stage_dir("sample"), settings,
                            adapter=name if start else None, adapter_path=start, overwrite=True)

    def _label(self) -> dict:
        from cai.labeling import LabelRun, pairs_from_responses
        from cai.prompts import PromptSet

        section = self.recipe.label
        rows = list(store.read_jsonl(self.stage_dir("sample") / "responses.jsonl"))
        settings = dataclasses.replace(section.settings, seed=self.recipe.seed)
        pairs = pairs_from_responses(rows, settings.pairing)
        return LabelRun(self.engine(section.model), self.constitution(), pairs, PromptSet(), self.stage_dir("label"),
                        settings, overwrite=True).run()

    def _blend(self) -> dict:
        from cai.blend import SourceSpec, blend

        section = self.recipe.blend
        sources = [SourceSpec(resolve_path(s.path), s.weight, s.skip_malformed) for s in section.sources]
        if section.include_ai_labels and "label" in self.recipe.stages:
            sources.append(SourceSpec(str(self.stage_dir("label") / "preferences.jsonl"), section.ai_weight))
        if section.include_critique_pairs and "critique" in self.recipe.stages:
            sources.append(SourceSpec(str(self.stage_dir("critique") / "preferences.jsonl"), section.critique_weight))
        sources = [s for s in sources if Path(s.path).exists() and Path(s.path).stat().st_size > 0]
        if not sources:
            raise CaiError("nothing to blend: no AI labels, critique pairs or extra sources", field="blend")
        summary = blend(sources, self.stage_dir("blend"), by=section.by, eval_fraction=section.eval_fraction, seed=self.recipe.seed)
        for source in summary["sources"]:
            if source["malformed_skipped"]:
                self.log(f"[blend] skipped {source['malformed_skipped']} malformed row(s) of {source['source']} "
                         f"(rows {', '.join(str(r['row']) for r in source['malformed_rows'][:10])}"
                         f"{', ...' if source['malformed_skipped'] > 10 else ''}; see blend/summary.json)")
        return summary

    def _rm(self) -> dict:
        section = self.recipe.rm
        settings = dataclasses.replace(section.settings, threads=self.recipe.threads, seed=self.recipe.seed)
        blend_dir = self.stage_dir("blend")
        return self._train("cai.train.reward:train_reward_model", train_file=blend_dir / "train.jsonl",
                           model_name=section.model or self.recipe.model, out_dir=self.stage_dir("rm"), settings=settings,
                           eval_file=blend_dir / "eval.jsonl")

    def _dpo(self) -> dict:
        train = dataclasses.replace(self.recipe.dpo.settings.train, threads=self.recipe.threads, seed=self.recipe.seed)
        settings = dataclasses.replace(self.recipe.dpo.settings, train=train)
        return self._train("cai.train.policy:train_dpo", data=self.stage_dir("blend"), model_name=self.recipe.model,
                           out_dir=self.stage_dir("dpo"), settings=settings, sft_adapter=self.start_adapter()[1])

    def _kto(self) -> dict:
        train = dataclasses.replace(self.recipe.kto.settings.train, threads=self.recipe.threads, seed=self.recipe.seed)
        settings = dataclasses.replace(self.recipe.kto.settings, train=train)
        return self._train("cai.train.kto:train_kto", data=self.stage_dir("blend"), model_name=self.recipe.model,
                           out_dir=self.stage_dir("kto"), settings=settings, sft_adapter=self.start_adapter()[1])

    def _online_dpo(self) -> dict:
        """Online DPO judged by cai's labeller on the feedback model (online_dpo.judge_model, else
        label.model, else the recipe's model) under the constitution, or by the reward model."""
        from cai.train.online_dpo import ConstitutionJudge, RewardJudge, train_online_dpo

        self._single_process("online_dpo", "its judge runs on the driver's engine between policy updates")
        section = self.recipe.online_dpo
        train = dataclasses.replace(section.settings.train, threads=self.recipe.threads, seed=self.recipe.seed)
        labeller = dataclasses.replace(section.settings.labeller, seed=self.recipe.seed)
        settings = dataclasses.replace(section.settings, train=train, labeller=labeller)
        prompts = _load_prompt_sources(section.prompts, "online_dpo")
        if settings.judge == "reward_model":
            judge = RewardJudge(self._scorer())
        else:
            judge = ConstitutionJudge(self.engine(section.judge_model or self.recipe.label.model), self.constitution(), labeller)
        metrics = train_online_dpo(prompts, self.recipe.model, judge, self.stage_dir("online_dpo"), settings,
                                   sft_adapter=self.start_adapter()[1])
        return {k: v for k, v in metrics.items() if k not in ("log_history", "eval_history")}

    def _scorer(self):
        from cai.train.reward import RewardScorer

        if "rm" not in self.recipe.stages:
            raise CaiError("this stage needs a reward model: add 'rm' to the stages", field="stages")
        return RewardScorer.load(self.stage_dir("rm"), threads=self.recipe.threads)

    def _ppo(self) -> dict:
        from cai.train.ppo import PPOTrainer

        self._single_process("ppo", "cai's PPO is a single-process loop")
        section = self.recipe.ppo
        settings = dataclasses.replace(section.settings, threads=self.recipe.threads, seed=self.recipe.seed)
        if settings.report_to == "none" and self.recipe.trl.get("report_to") not in (None, "none"):
            settings = dataclasses.replace(settings, report_to=self.recipe.trl["report_to"])  # the run's tracker
        prompts = [list(p.messages) for p in _load_prompt_sources(section.prompts, "ppo")]
        history = PPOTrainer(self.recipe.model, self._scorer().score, prompts, self.stage_dir("ppo"), settings,
                             sft_adapter=self.start_adapter()[1]).train(log=self.log)
        return {"steps": len(history), "first_reward": history[0]["reward"], "last_reward": history[-1]["reward"], "last_kl": history[-1]["kl"]}

    def _online(self, method: str) -> dict:
        section = getattr(self.recipe, method)
        train = dataclasses.replace(section.settings.train, threads=self.recipe.threads, seed=self.recipe.seed)
        settings = dataclasses.replace(section.settings, train=train)
        if "rm" not in self.recipe.stages:
            raise CaiError("this stage needs a reward model: add 'rm' to the stages", field="stages")
        return self._train("cai.train.online:train_online", prompts=_load_prompt_sources(section.prompts, method),
                           model_name=self.recipe.model, scorer=self.stage_dir("rm"), out_dir=self.stage_dir(method),
                           settings=settings, method=method, sft_adapter=self.start_adapter()[1])

    def _grpo(self) -> dict:
        return self._online("grpo")

    def _rloo(self) -> dict:
        return self._online("rloo")

    def _best_of_n(self) -> dict:
        from cai.train.online import best_of_n

        section = self.recipe.best_of_n
        name, start = self.start_adapter()
        return best_of_n(self.engine(adapters={name: start} if start else None), self._scorer(),
                         _load_prompt_sources(section.prompts, "best_of_n"), self.stage_dir("best_of_n"), n=section.n,
                         sampling=section.sampling, adapter=name if start else None, seed=self.recipe.seed)

    def _eval_probe_sets(self, calibration) -> dict:
        """The eval's probe sets, loaded (and checked) before any model starts."""
        from cai.eval_sycophancy import load_probes
        from cai.refusal import from_calibration, load_labelled_completions, load_xstest

        section = self.recipe.eval
        syc, xs = section.sycophancy, section.xstest
        completions = from_calibration(calibration)
        if section.refusal.labels:
            completions += load_labelled_completions(resolve_path(section.refusal.labels))
        return {
            "sycophancy_items": load_probes(resolve_path(syc.path), columns=syc.columns, limit=syc.limit) if syc.path else [],
            "sycophancy": syc,
            "safety": load_xstest(resolve_path(xs.path), columns=xs.columns, limit=xs.limit) if xs.path else [],
            "xstest": xs, "refusal_completions": completions, "refusal": section.refusal,
        }

    def _eval(self) -> dict:
        """The judge is `eval.judge_model` (default: the recipe's model, flagged in the report) on
        `eval.judge_engine` (default: the recipe's engine). The judge and the reward model are
        built only when their phase comes, and on a GPU every engine is handed back between
        phases, so one card holds the policy's engine, the KL model and the judge in turn."""
        import gc

        from cai.engines import close_all, get_engine
        from cai.eval_judge import judge_relation, load_calibration, reward_model_relation, same_model
        from cai.evaluation import evaluate_policy

        section = self.recipe.eval
        policy_stage = self.policy_stage()
        policy = self.adapter(policy_stage) if policy_stage else None
        baseline = self.adapter("sft")
        if policy is None:
            raise CaiError(f"eval needs a trained policy: add one of {', '.join(POLICY_STAGES)} to the stages", field="stages")
        judge_model = section.judge_model or self.recipe.model
        shared = self.recipe.engine
        served = getattr(shared.openai, "served_model", None) or getattr(shared.openai, "tokenizer", None)
        if section.judge_engine is None and shared.kind == "openai" and served and not same_model(judge_model, self.recipe.model):
            raise CaiError(f"the judge '{judge_model}' would be asked through engine.openai, whose servers run '{served}': "
                           "point eval.judge_engine at the server that serves the judge", field="eval.judge_engine")
        calibration = load_calibration(resolve_path(section.judge_calibration)) if section.judge_calibration else []
        probes = self._eval_probe_sets(calibration)

        def judge_engine():
            if section.judge_engine is None:
                return self.engine(judge_model)
            settings = dataclasses.replace(section.judge_engine, threads=section.judge_engine.threads or self.recipe.threads,
                                           trust_remote_code=self.recipe.trust_remote_code)
            return get_engine(judge_model, settings)

        def free_device() -> None:
            import torch

            if torch.cuda.is_available():
                close_all()
                gc.collect()
                torch.cuda.empty_cache()

        adapters = {"policy": policy, **({"baseline": baseline} if baseline else {})}
        engine = self.engine(adapters=adapters)
        metrics = evaluate_policy(
            engine, judge_engine, self.constitution(), _load_prompt_sources(section.red_team, "eval.red_team"),
            _load_prompt_sources(section.benign, "eval.benign"), self.stage_dir("eval"),
            policy_adapter="policy", baseline_adapter="baseline" if baseline else None,
            scorer=self._scorer if "rm" in self.recipe.stages else None,
            model_name=self.recipe.model, policy_adapter_path=policy, baseline_adapter_path=baseline,
            baseline_name="sft" if baseline else "base", max_tokens=section.max_tokens,
            harm_question=section.harm_question, refusal_question=section.refusal_question,
            preference=section.preference, calibration=calibration, kl=section.kl, free_device=free_device, **probes,
            earlier=[self.stage_dir("eval", i) for i in range(1, self.iteration)],
            seed=self.recipe.seed, threads=self.recipe.threads, trust_remote_code=self.recipe.trust_remote_code, log=self.log,
        )
        if section.harness.tasks:
            from cai.eval_harness import run_harness

            free_device()
            metrics["harness"] = run_harness(self.recipe.model, {"policy": policy, "baseline": baseline}, section.harness,
                                             self.stage_dir("eval"), threads=self.recipe.threads,
                                             trust_remote_code=self.recipe.trust_remote_code, log=self.log)
        metrics["policy_stage"] = policy_stage
        metrics["baseline"] = "sft" if baseline else "base"
        metrics["judge_relation"] = judge_relation(judge_model, self.recipe.model)
        if "label" in self.recipe.stages:
            metrics["judge_is_labeller"] = same_model(judge_model, self.recipe.label.model or self.recipe.model)
        if "win_rate_reward_model" in metrics:
            metrics["reward_model_relation"] = reward_model_relation(policy_stage)
        metrics["judge_calibration"]["file"] = section.judge_calibration
        store.write_json_atomic(self.stage_dir("eval") / "metrics.json", metrics)
        return {k: v for k, v in metrics.items() if k != "reward"}
