"""The stages of train.py, in the order they run: sweep, heads, fine-tuning, test set.

Each stage takes the job (`workflow.train.job.Job`) and only the parts of the
configuration it needs, and writes its outputs into the run folder.
"""

import dataclasses
import logging
import os
import shlex
import shutil
import time
from typing import Optional

import numpy as np

from small_photo_classifier.features.choose import probe, sweep
from small_photo_classifier.features.fit import heads as heads_lib
from small_photo_classifier.features.serve import inference
from small_photo_classifier.pipeline import discovery, labels, progress, scan
from small_photo_classifier.workflow.base import console, state as state_lib
from small_photo_classifier.workflow.train import export, labelling, near_groups
from small_photo_classifier.workflow.use import loaded
from small_photo_classifier.workflow.views import interpret, plots, summary
from small_photo_classifier.workflow.train import bagging, heads_choice, no_effect, trusting
from small_photo_classifier.workflow.train.export import PROBE
from small_photo_classifier.workflow.base.config import (CacheConfig, HeadsConfig, RuntimeConfig,
                                                         SweepConfig, TrainConfig)
from small_photo_classifier.workflow.base.clock import TOTAL, StageClock
from small_photo_classifier.workflow.train.job import (Features, Job, check_disk, fit_settings,
                                                       prepare)
from small_photo_classifier.workflow.base.outputs import binary_column, write_predictions


def _interpret(job: Job, folder: str, probs, what: str) -> None:
    """confusion_matrix.png, roc.png, top_losses.png of ``probs`` on the validation set."""
    interpret.write_all(folder, job.val.path.tolist(), job.y_val, probs, job.task,
                        f"{what}, validation")


def heads_stage(job: Job, heads: HeadsConfig, cache: CacheConfig, runtime: RuntimeConfig,
                view_preset: str, chosen: Optional[heads_lib.HeadConfig] = None,
                whole_mode: str = "no") -> str:
    """Probe + scenarios on the cache; returns the best scenario. ``chosen``: a sweep config.
    ``whole_mode`` (--whole_network): when the final stage will try the whole network
    first, the bag's members wait for its verdict (`Job.pending_bag`): a bag of frozen
    fold heads is of no use once the whole network is exported (seedlings: 298 s)."""
    bag_folder = job.run.file("heads", "bag")
    shutil.rmtree(bag_folder, ignore_errors=True)  # never mix with an old bag
    progress.report("heads", "repeat the heads stage (it trains from the feature cache)")
    views = chosen.views if chosen else cache.augmented_views
    with job.clock.stage("feature cache (extraction or reuse)"):
        train, val, view_feats = Features(job, cache, runtime.batch_size).split(views,
                                                                               view_preset)
    with job.clock.stage("linear probe (choice by CV, fit)"):
        baseline, probe_choice, estimator = probe.run(train, job.y_train, val, job.y_val,
                                                      job.task, job.probe_folds(), job.seed,
                                                      job.class_weight)
    probe_val = probe.probabilities(estimator, probe.pooled(
        val[job.classifier.net.feature_layer], probe_choice.config.pooling), job.task)
    job.run.update_metrics("probe", baseline)
    configs = ([chosen] if chosen else
               [heads_lib.HeadConfig.for_scenario(s, heads.learning_rate,
                                                  pooling=job.classifier.net.pooling,
                                                  optimizer=heads.optimizer, views=views)
                for s in heads.scenarios])
    with job.clock.stage("scenarios on cached features"):
        results = heads_lib.train_scenarios(
            job.classifier, configs, job.task,
            heads_lib.FeatureSplit(train, job.y_train, view_feats, job.folds),
            heads_lib.FeatureSplit(val, job.y_val), fit_settings(job, heads, cache, runtime),
            out_dir=job.run.path, tensorboard_dir=job.board)
    best = _record_heads(job, results)
    choice = (heads_choice.probe_or_head(job, best, probe_choice, baseline,
                                         heads.probe_baseline, probe_val)
              if chosen is None else
              {"scenario": best.scenario, "by": "--use_sweep", "score": best.score,
               "metric": job.task.headline})
    job.run.update_metrics("heads_choice", choice)
    _record_state(job, baseline, results, choice)
    heads_choice.save_honest(job, heads_choice.honest_val(job, choice, results, probe_val))
    _plot_heads(job, results, baseline)
    if best.cv is not None:
        chosen_oof = probe_choice.oof_probs if choice["scenario"] == PROBE else best.cv.oof_probs
        trusting.save_oof(job, choice["scenario"], chosen_oof)  # the export calibrates on them
        with job.clock.stage("label audit (suspect labels, duplicates)"):
            labelling.audit(job, chosen_oof, cache, runtime, "linear probe"
                            if choice["scenario"] == PROBE else f"scenario {best.scenario}")
    if heads.bag and best.cv is not None and choice["scenario"] != PROBE:
        # (An exported probe has no bag: the scenario's fold heads would go unused.)
        bagging.make_or_defer(job, best, (heads, cache, runtime), (views, view_preset),
                              bag_folder, runtime.finetunes and bagging.whole_first(
                                  job, whole_mode, choice["scenario"]))
    print(summary.heads(results, baseline, best, job.task))
    print(heads_choice.choice_sentence(choice, best.scenario))
    progress.clear("heads")
    return choice["scenario"]


# Each scenario's epochs on the cached features: ``heads/<S>/history.csv``.
HISTORY = "history.csv"


def _record_heads(job: Job, results):
    """Each scenario's history, metrics and plots; returns the best result."""
    job.heads = {s: r.weights for s, r in results.items() if r.weights is not None}
    for s, r in results.items():
        # From the fit's own history, written once and atomically: a CSVLogger writes
        # while training (a kill leaves a torn file) and numbers epochs from 0.
        # In the scenario's own folder: the top level is the exported model's.
        job.run.write_csv(r.history, "heads", s, HISTORY)
        old = job.run.file(f"history_heads_{s}.csv")  # where earlier versions wrote it
        if os.path.isfile(old):
            os.remove(old)
    best = heads_lib.best_result(results)
    # In a folder named for the scenario: the top-level files of the same names are the
    # exported model's, and this scenario may not be the one exported.
    for stale in interpret.FILES:  # where earlier versions drew them
        if os.path.isfile(job.run.file("heads", stale)):
            os.remove(job.run.file("heads", stale))
    _interpret(job, job.run.file("heads", best.scenario), best.val_probs,
               f"heads scenario {best.scenario}")
    job.run.update_metrics("heads", {s: r.summary() for s, r in results.items()})
    if job.folds:
        job.run.update_metrics("cross_validation", {s: r.cv.summary() for s, r in results.items()})
    return best


def _plot_heads(job: Job, results, baseline: dict) -> None:
    """heads_comparison.png: each scenario's mean CV score per epoch (what ranked them),
    and the validation curve of each scenario fitted on the whole training split."""
    name = job.task.headline
    if any(r.cv is not None for r in results.values()):
        shown = (f"cv_{name}", f"val_{name}")
        title = "Scenarios on cached features (cross-validation mean; validation if fitted)"
    else:
        shown = tuple(dict.fromkeys(("val_accuracy", f"val_{name}", "val_auc")))
        title = "Scenarios on cached features (validation)"
    reference = {f"val_{name}": (baseline[f"val_{name}"], "linear probe")}
    if f"cv_{name}_mean" in baseline:
        reference[f"cv_{name}"] = (baseline[f"cv_{name}_mean"], "linear probe")
    plots.curves(
        {s: r.history for s, r in results.items()}, job.run.file("heads_comparison.png"),
        metrics_to_plot=shown, title=title, reference=reference,
        marks={s: r.best_epoch for s, r in results.items()})


def _record_state(job: Job, baseline: dict, results, choice: dict) -> None:
    """The heads stage's part of the run state: the probe, each scenario, the choice."""
    name = job.task.headline
    probe_state = state_lib.ProbeState(
        baseline["pooling"], bool(baseline["standardised"]), baseline["C"],
        baseline.get(f"val_{name}"), baseline.get(f"cv_{name}_mean"),
        baseline.get(f"cv_{name}_std"))
    heads = {s: state_lib.HeadState(
        int(r.best_epoch), r.config.learning_rate if r.config else None,
        r.config.optimizer if r.config else "adam", r.config.dropout if r.config else None,
        int(r.config.views) if r.config else 0, float(r.val_score) if r.fitted else None,
        float(r.cv.mean) if r.cv else None, float(r.cv.std) if r.cv else None)
        for s, r in results.items()}
    state_lib.update(job.run.path, probe=probe_state, heads=heads, choice=choice["scenario"],
                     choice_by=choice["by"])


def sweep_stage(job: Job, config: SweepConfig, heads: HeadsConfig, cache: CacheConfig,
                runtime: RuntimeConfig, view_preset: str) -> heads_lib.HeadConfig:
    """Scores the sweep grid by CV on the training split; writes sweep.csv and sweep.png."""
    grid = sweep.build_grid(config.scenarios, config.learning_rates, config.optimizers,
                            config.dropouts, config.views, job.classifier.dropout is not None)
    train, _, view_feats = Features(job, cache, runtime.batch_size).split(
        max(c.views for c in grid), view_preset)
    folds = job.make_folds(config.folds)
    logging.info("Sweep: %d configurations x %d folds, %d epochs each.", len(grid), len(folds),
                 heads.epochs)
    started = time.perf_counter()
    table = sweep.run(job.classifier, grid, job.task,
                      heads_lib.FeatureSplit(train, job.y_train, view_feats, folds),
                      fit_settings(job, heads, cache, runtime))
    metric = job.task.headline
    x = probe.pooled(train[job.classifier.net.feature_layer])
    baseline = probe.cross_validate(x, job.y_train, folds,
                                    job.task, job.seed)
    job.run.write_csv(table, "sweep.csv")

    def describe(row):
        return heads_lib.HeadConfig(row.scenario, row.learning_rate, row.optimizer,
                                    None if row.dropout != row.dropout else row.dropout,
                                    int(row.views)).describe()
    plots.sweep(table, job.run.file("sweep.png"), metric, describe, baseline[f"{metric}_mean"])
    job.run.update_metrics("sweep", {
        "configurations": len(table), "folds": len(folds),
        "seconds": round(time.perf_counter() - started, 1),
        "best": table.iloc[0].drop("rank").to_dict(),
        f"probe_cv_{metric}_mean": baseline[f"{metric}_mean"],
        f"probe_cv_{metric}_std": baseline[f"{metric}_std"]})
    print(f"Sweep: {len(table)} configurations, {len(folds)}-fold CV on {len(job.y_train)} "
          f"training images; linear probe CV {summary.label(metric)} "
          f"{baseline[f'{metric}_mean']:.4f} +- {baseline[f'{metric}_std']:.4f}"
          f"\n{sweep.format_top(table)}")
    return sweep.best_config(table)


def predict_test(job: Job, runtime: RuntimeConfig, demo: bool = False) -> None:
    """Predicts the Kaggle test/ folder into submission.csv with the exported default (model
    or bag, its TTA, its calibration), in sample_submission.csv's row order when it exists.
    An unreadable test image gets no row; bad_test_images.csv lists it with the reason."""
    test = discovery.discover_unlabelled(job.dataset.data_dir)
    test = scan.filter_bad_images(test, job.model.image_size, "skip",
                                  job.run.file("bad_test_images.csv"), keep_rows=True,
                                  max_pixels=job.max_pixels)
    # The run folder as predict.py loads it: the default model or bag, its TTA, its
    # calibration (`workflow.use.loaded`), so submission.csv holds predict.py's numbers.
    run = loaded.load(job.run.path, precision=job.precision.policy, unfamiliar=False)
    outputs = run.predict_frame(test, runtime.batch_size)
    good = ~test.bad.to_numpy(bool)
    probs = run.apply(outputs)[0][good]
    test = test[good].reset_index(drop=True)
    write_predictions(
        test.name, probs, job.run.file("submission.csv"), job.task.class_names,
        binary_column=binary_column(job.task.class_names, job.dataset.sample_submission,
                                    job.dataset.label_column))
    if not good.all():
        print(f"submission.csv: {int((~good).sum())} unreadable test image(s) got no row; "
              f"see {job.run.file('bad_test_images.csv')}")
    hidden = os.path.join(job.dataset.data_dir, "test_labels.csv")
    if demo and os.path.isfile(hidden):
        truth = labels.read_labels(hidden, class_order=job.task.class_names,
                                   task=job.task.kind).frame
        y = np.asarray(truth.set_index("name").label.reindex(test.name).tolist())
        print(f"{run.model_file} on the demo's {len(test)} "
              "synthetic test images (never trained on): "
              f"{summary.scores_line(job.task, job.task.scores(y, probs))}")


def _run_stages(cfg: TrainConfig, engine=None, dataset=None):
    """The stages, in the order they run."""
    started = time.perf_counter()
    clock = StageClock()
    with clock.stage(TOTAL):
        job = _stages(cfg, clock, engine, dataset)
    if not cfg.runtime.studies:
        for key, value in clock.record().items():
            job.run.update_metrics(key, value)
    _write_report(job, cfg.runtime)
    _print_outputs(job, started)
    return job


def _stages(cfg: TrainConfig, clock: StageClock, engine=None, dataset=None):
    runtime = cfg.runtime
    with clock.stage("start-up and data check"):
        job = prepare(cfg.data, cfg.model, cfg.heads, cfg.cache, runtime, cfg.flag_values,
                      dataset)
        job.clock = clock
        view_preset = cfg.finetune.view_preset
        every_layer = max(cfg.cache.augmented_views,
                          max(cfg.sweep.views) if cfg.runtime.stage == "sweep" or cfg.sweep.use
                          else 0)
        finetune_views = (cfg.finetune.views if runtime.finetunes
                          and cfg.finetune.augment != "none" else 0)
        check_disk(job, cfg.cache, max(every_layer, finetune_views), view_preset,
                   exports=(2 if cfg.heads.bag else 1) if runtime.finetunes else 0,
                   views_of_every_layer=every_layer > 0)  # (an over-estimate then)
        if engine is not None:
            engine.precision = job.precision.policy
            job.engine = engine.start()
    if near_groups.wanted(job, cfg):
        with clock.stage("near-duplicate groups (feature cache, extraction or reuse)"):
            job = near_groups.regroup(job, cfg)
    if cfg.model.compare:
        from small_photo_classifier.workflow.train import backbones as backbones_stage
        with clock.stage("backbone comparison"):
            _, job = backbones_stage.run(job, cfg, cfg.model.compare)
        job.clock = clock
        if runtime.stage == "backbones":
            return job
    chosen = None
    sweep_file = job.run.file("sweep.csv")
    if runtime.stage == "sweep" or (cfg.sweep.use and runtime.stage == "all"
                                    and not os.path.isfile(sweep_file)):
        with clock.stage("sweep"):
            chosen = sweep_stage(job, cfg.sweep, cfg.heads, cfg.cache, runtime, view_preset)
    elif cfg.sweep.use:
        chosen = sweep.best_config(sweep.read_table(sweep_file))
    if chosen is not None and cfg.sweep.use:
        logging.info("Using the sweep's best configuration: %s.", chosen.describe())
        job.classifier.set_dropout(chosen.dropout)
        chosen = dataclasses.replace(chosen, dropout=None)
    if runtime.studies:
        _later_stage(job, cfg, clock)
    else:
        _train_and_export(job, cfg, chosen, view_preset)
    return job


def _later_stage(job: Job, cfg: TrainConfig, clock: StageClock) -> None:
    """--stage=curve or label_next: its results, time and peak memory under its own key
    of metrics.json (``stages/<stage>``), beside what training recorded."""
    runtime = cfg.runtime
    started = time.perf_counter()
    if runtime.stage == "curve":
        labelling.curve_stage(job, cfg.heads, cfg.cache, runtime)
        record = {}
    else:
        table = labelling.label_next_stage(
            job, cfg.cache, runtime, cfg.labelling.unlabelled_dir, cfg.labelling.budget,
            cfg.labelling.strategy, cfg.data.on_bad_image)
        record = {"strategy": cfg.labelling.strategy, "budget": cfg.labelling.budget,
                  "picked": int(len(table)), "unlabelled_dir": cfg.labelling.unlabelled_dir,
                  "files": ["to_label.csv", "to_label.png", "labels_template.csv"]}
    stages = dict(state_lib.load(job.run.path).stages)
    stages[runtime.stage] = {**record, "seconds": round(time.perf_counter() - started, 1),
                             "total_seconds": round(clock.elapsed(TOTAL), 1),
                             "peak_memory_mb": round(clock.peak_so_far(TOTAL)),
                             "settings": runtime.config_file,
                             "command": console.command_line()}
    state_lib.update(job.run.path, stages=stages)
    job.run.update_metrics("stages", stages)


def _train_and_export(job: Job, cfg: TrainConfig, chosen, view_preset: str) -> None:
    """The heads stage, the final model and its exports, the test set, each timed by the
    job's clock."""
    runtime = cfg.runtime
    scenario = None
    if runtime.heads:
        scenario = heads_stage(job, cfg.heads, cfg.cache, runtime, view_preset,
                               chosen if cfg.sweep.use else None, cfg.finetune.whole)
    if runtime.finetunes:
        scenario = (cfg.finetune.scenario or
                    (chosen.scenario if cfg.sweep.use and chosen else None) or
                    scenario or chosen_scenario(job))
        with job.clock.stage("final model (fine-tuning, output choice, export)"):
            export.finetune_stage(job, cfg, scenario,
                                  optimizer=chosen.optimizer if cfg.sweep.use and chosen
                                  else "adam")
        no_effect.record(job, no_effect.find(job, cfg.given, scenario, cfg.finetune.epochs))
        if cfg.deploy.formats:
            from small_photo_classifier.workflow.use import deploy
            with job.clock.stage("deployment exports"):
                deploy.deploy_run(job.run.path, cfg.deploy.formats, cfg.deploy.quantize,
                                  runtime.batch_size)
        if runtime.stage == "all" and job.dataset.test_dir:
            with job.clock.stage("test-set prediction"):
                predict_test(job, runtime, demo=cfg.data.demo)


def _write_report(job: Job, runtime: RuntimeConfig) -> None:
    """report.html: the trained run on one page (a later stage adds its section, never
    replaces the training's), with the commands to go on from it."""
    from small_photo_classifier.workflow.views import report
    from small_photo_classifier.workflow.base.outputs import read_json
    trained = read_json(job.run.file("run_config.json")).get("command")
    commands = {"Train again with the same settings": trained or console.command_line()}
    if os.path.isfile(job.run.file(inference.MODEL_FILE)):
        commands["Predict"] = next_command(job)
    if runtime.finetunes and "best_epoch" in job.run.metrics().get("finetune", {}):
        commands["Resume an interrupted fine-tuning"] = (
            (trained or console.command_line()) + " --stage=finetune --resume")
    for stage, record in state_lib.load(job.run.path).stages.items():
        commands[f"Run --stage={stage} again"] = record.get("command", "")
    state_lib.update(job.run.path, report_commands=commands)
    report.write_run_report(job.run.path, commands)


def chosen_scenario(job: Job) -> str:
    """The scenario the heads stage chose (recorded in the run state)."""
    from small_photo_classifier.pipeline.errors import ConfigError
    state = state_lib.load(job.run.path)
    if state.choice:
        logging.info("Scenario chosen by the heads stage (by %s): %s.", state.choice_by,
                     state.choice)
        return state.choice
    raise ConfigError(f"No heads-stage results in {job.run.path} (run_state.json): run "
                      "--stage=heads first or pass --scenario.")


def _print_outputs(job: Job, started: float) -> None:
    """The last lines: time and memory by stage, then every file in the run folder with
    its role (`workflow.base.run_files`: the README's table), and the command to go on."""
    from small_photo_classifier.workflow.base import run_files
    if job.clock.seconds:
        print("\nTime and peak memory (RSS) by stage:\n" + job.clock.table())
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs in {job.run.path}:")
    print("\n".join(run_files.listing(job.run.path)))
    if os.path.isfile(job.run.file(inference.MODEL_FILE)):
        print("Next: " + next_command(job))


def next_command(job: Job) -> str:
    """The predict.py command to run next, as it can be pasted: on the data's own test
    folder when it has one (scored against its labels when they are known, as the
    demo's are), else on a folder the user names."""
    q = shlex.quote
    root, workdir = job.dataset.data_dir, job.run.path
    if not job.dataset.test_dir:
        return (f"python predict.py --workdir={q(workdir)} --data_dir=<folder of new photos> "
                f"--output=predictions.csv")
    command = (f"python predict.py --workdir={q(workdir)} --data_dir={q(root)} "
               f"--output={q(os.path.join(workdir, 'test_predictions.csv'))}")
    labels_csv = os.path.join(root, "test_labels.csv")
    if os.path.isfile(labels_csv):
        command += f" --labels={q(labels_csv)}"
    return command


def run(cfg: TrainConfig, dataset=None):
    """The whole training job, under the chosen tf.distribute strategy. ``dataset``: the
    data already discovered (train.py does so before TensorFlow starts)."""
    from small_photo_classifier.features import distribute
    engine = None
    if cfg.runtime.ray_address:
        from small_photo_classifier.features.serve import ray_engine
        engine = ray_engine.RayEngine(cfg.runtime.ray_address, cfg.runtime.ray_workers, build={
            "weights": cfg.model.weights, "include_top": cfg.model.include_top,
            "image_size": cfg.model.image_size, "seed": cfg.seed,
            "backbone": cfg.model.backbone})
    try:
        with distribute.scope(distribute.make_strategy(cfg.runtime.strategy,
                                                       cfg.runtime.cpu_replicas)):
            return _run_stages(cfg, engine, dataset)
    finally:
        if engine is not None:
            engine.stop()
