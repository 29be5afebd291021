"""The stages of train.py, in the order they run: sweep, heads, fine-tuning, test set.

Each stage takes the job (`workflow.job.Job`) and only the parts of the
configuration it needs, and writes its outputs into the run folder.
"""

import dataclasses
import logging
import os
import shutil
import time
from typing import Optional

import numpy as np

from features import bag as bag_lib, heads as heads_lib, inference, probe, scenarios, sweep
from features import finetune as finetune_lib
from features import task as task_lib
from features.weights import weights_identity
from features import cache as cache_lib
from pipeline import discovery, labels, progress, scan
from workflow import interpret, plots, summary
from workflow.config import (CacheConfig, FinetuneConfig, HeadsConfig, PredictConfig,
                             RuntimeConfig, SweepConfig, TrainConfig)
from workflow.job import Features, Job, check_disk, memory_budget, prepare
from workflow.outputs import submission_column, write_predictions


def _board(job: Job, runtime: RuntimeConfig) -> Optional[str]:
    """Where TensorBoard logs go (None with --notensorboard)."""
    if not runtime.tensorboard:
        return None
    return job.run.note("tensorboard", job.run.file("tensorboard"))


def _interpret(job: Job, folder: str, probs, what: str) -> None:
    """confusion_matrix.png, roc.png, top_losses.png of ``probs`` on the validation set."""
    interpret.write_all(folder, job.val.path.tolist(), job.y_val, probs, job.task,
                        f"{what}, validation")
    job.run.note(f"{what} plots", os.path.join(folder, "{" + ",".join(interpret.FILES) + "}"))


def heads_stage(job: Job, heads: HeadsConfig, cache: CacheConfig, runtime: RuntimeConfig,
                view_preset: str, chosen: Optional[heads_lib.HeadConfig] = None) -> str:
    """Probe + scenarios on the cache; returns the best scenario. ``chosen``: a sweep config."""
    bag_folder = job.run.file("heads", "bag")
    shutil.rmtree(bag_folder, ignore_errors=True)  # never mix with an old bag
    progress.report("heads", "repeat the heads stage (it trains from the feature cache)")
    views = chosen.views if chosen else cache.augmented_views
    train, val, view_feats = Features(job, cache, runtime.batch_size).split(views, view_preset)
    baseline = probe.run(train, job.y_train, val, job.y_val, job.task, job.folds, job.seed)
    job.run.update_metrics("probe", baseline)
    configs = ([chosen] if chosen else
               [heads_lib.HeadConfig.for_scenario(s, heads.learning_rate,
                                                  optimizer=heads.optimizer, views=views)
                for s in heads.scenarios])
    results = heads_lib.train_scenarios(
        job.classifier, configs, job.task, train, job.y_train, val, job.y_val,
        epochs=heads.epochs, batch_size=runtime.batch_size, seed=job.seed, folds=job.folds,
        views_feats=view_feats, out_dir=job.run.path, tensorboard_dir=_board(job, runtime),
        memory_budget=memory_budget(cache) / 4, label_smoothing=heads.label_smoothing)
    for s, r in results.items():
        # From the fit's own history, written once and atomically: a CSVLogger writes
        # while training (a kill leaves a torn file) and numbers epochs from 0.
        job.run.write_csv(r.history, f"history_heads_{s}.csv")
    best = heads_lib.best_result(results)
    _interpret(job, job.run.file("heads"), best.val_probs, f"heads scenario {best.scenario}")
    job.run.update_metrics("heads", {s: r.summary() for s, r in results.items()})
    if job.folds:
        job.run.update_metrics("cross_validation", {s: r.cv.summary() for s, r in results.items()})
    job.run.update_metrics("heads_choice", {"scenario": best.scenario, "by": best.selected_by,
                                            "score": best.score, "metric": job.task.headline})
    metric = f"val_{job.task.headline}"
    job.run.note("heads plot", plots.curves(
        {s: r.history for s, r in results.items()}, job.run.file("heads_comparison.png"),
        metrics_to_plot=tuple(dict.fromkeys(("val_accuracy", metric, "val_auc"))),
        title="Scenarios on cached features (validation)",
        reference={metric: (baseline[metric], "linear probe")},
        marks={s: r.best_epoch for s, r in results.items()}))
    if heads.bag and best.cv is not None:
        blocks = best.config.row.blocks
        members = [bag_lib.as_member(job.classifier, blocks, m) for m in best.cv.members]
        bag_lib.save_members(bag_folder, best.scenario, members)
        logging.info("Bag: the %d fold heads of scenario %s (kept from its cross-validation) "
                     "saved in %s.", len(members), best.scenario, bag_folder)
    print(summary.heads(results, baseline, best, job.task))
    progress.clear("heads")
    return best.scenario


def sweep_stage(job: Job, config: SweepConfig, heads: HeadsConfig, cache: CacheConfig,
                runtime: RuntimeConfig, view_preset: str) -> heads_lib.HeadConfig:
    """Scores the sweep grid by CV on the training split; writes sweep.csv and sweep.png."""
    grid = sweep.build_grid(config.scenarios, config.learning_rates, config.optimizers,
                            config.dropouts, config.views, job.classifier.dropout is not None)
    train, _, view_feats = Features(job, cache, runtime.batch_size).split(
        max(c.views for c in grid), view_preset)
    from features import cv as cv_lib
    folds = cv_lib.make_folds(job.y_train, config.folds, job.seed, job.task)
    logging.info("Sweep: %d configurations x %d folds, %d epochs each.", len(grid), len(folds),
                 heads.epochs)
    started = time.perf_counter()
    table = sweep.run(job.classifier, grid, job.task, train, job.y_train, folds,
                      epochs=heads.epochs, batch_size=runtime.batch_size, seed=job.seed,
                      views_feats=view_feats, memory_budget=memory_budget(cache) / 4)
    metric = job.task.headline
    baseline = probe.cross_validate(probe.pooled(train[probe.PROBE_LAYER]), job.y_train, folds,
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
    job.run.note("sweep table", job.run.file("sweep.csv"))
    job.run.note("sweep plot", job.run.file("sweep.png"))
    print(f"Sweep: {len(table)} configurations, {len(folds)}-fold CV on {len(job.y_train)} "
          f"training images; linear probe CV {summary.label(metric)} "
          f"{baseline[f'{metric}_mean']:.4f} +- {baseline[f'{metric}_std']:.4f}"
          f"\n{sweep.format_top(table)}")
    return sweep.best_config(table)


def _validate(job: Job, model, batch_size: int):
    """(scores, probabilities) of ``model`` on the validation images."""
    outputs = inference.predict_paths(model, job.val.path.tolist(), job.val.name.tolist(),
                                      job.model.image_size, batch_size, progress=False)
    probs = job.task.probabilities(outputs)
    return job.task.scores(job.y_val, probs), probs


def _cached_views(job: Job, config: FinetuneConfig, cache: CacheConfig, batch_size: int,
                  blocks) -> Optional[finetune_lib.CachedViews]:
    """`finetune.CachedViews` for --finetune_views=K when the blocks start above a cached
    layer (extracting the views once), else None: the whole network trains from images."""
    start = scenarios.start_layer(blocks, job.classifier.include_top)
    if config.views <= 0:
        return None
    if start not in cache_lib.cached_layers(job.model.include_top):
        logging.info("Fine-tuning blocks %s reach below every cached layer: training the whole "
                     "network from images (--finetune_views applies above a cached layer).",
                     ",".join(blocks))
        return None
    features = Features(job, cache, batch_size)
    if config.augment == "none":  # K identical views would be the plain features K times
        train, val, _ = features.split()
        views, train_x = 1, train[start]
    else:
        train, val, aug = features.split(config.views, config.view_preset)
        views, train_x = config.views, aug[start]
    return finetune_lib.CachedViews(start, train_x, np.concatenate([job.y_train] * views),
                                    val[start], job.y_val, views)


def finetune_stage(job: Job, config: FinetuneConfig, heads: HeadsConfig, cache: CacheConfig,
                   runtime: RuntimeConfig, scenario: str, optimizer: str = "adam") -> None:
    """Fine-tunes ``scenario`` from its cache-trained head and exports the model (and bag)."""
    head_weights = heads_lib.weights_file(job.run.path, scenario)
    heads_lib.load_scenario_weights(job.classifier, scenario, head_weights)
    blocks = (scenarios.parse_blocks(config.trainable_blocks) if config.trainable_blocks
              else list(scenarios.get_scenario(scenario).blocks))
    logging.info("Fine-tuning scenario %s (blocks %s) from %s.", scenario, ",".join(blocks),
                 head_weights)
    result = {"scenario": scenario, "blocks": blocks, "optimizer": optimizer}
    checkpoints = None
    if config.epochs > 0:
        ft = _finetune(job, config, heads, cache, runtime, scenario, blocks, optimizer)
        checkpoints = ft.pop("checkpoints")
        result.update(ft)
    scores, probs = _validate(job, job.classifier.model, runtime.batch_size)
    thresholds = _final_report(job, probs)
    if thresholds is not None:
        scores = job.task.scores(job.y_val, probs, thresholds)
        result["thresholds"] = {"values": [round(float(t), 6) for t in thresholds],
                                "chosen_on": "validation (best F1 per label)"}
    result.update({f"val_{k}": v for k, v in scores.items()})
    job.run.update_metrics("finetune", result)
    info = _model_info(job, scenario, blocks, scores, thresholds)
    bag = _export_bag(job, heads, runtime, scenario, blocks, scores) if heads.bag else None
    if not heads.bag:
        _remove_stale_bag(job)
    if bag:
        info["bag"] = bag
    job.run.note("model", inference.export_model(job.classifier.model, job.run.path, info))
    if checkpoints is not None:
        checkpoints.remove()  # exported: nothing left to resume (kept when a run fails)
    probe_score = job.run.metrics().get("probe", {}).get(f"val_{job.task.headline}")
    print(summary.final(job.task, scenario, scores, probe_score, bag))


def _finetune(job: Job, config: FinetuneConfig, heads: HeadsConfig, cache: CacheConfig,
              runtime: RuntimeConfig, scenario: str, blocks, optimizer: str) -> dict:
    """Runs the fine-tuning; writes its history CSV and plot; returns its summary."""
    started = time.perf_counter()
    cached = _cached_views(job, config, cache, runtime.batch_size, blocks)
    ft = finetune_lib.finetune(
        job.classifier, blocks, job.task, job.train, job.val, workdir=job.run.path,
        image_size=job.model.image_size, batch_size=runtime.batch_size,
        augment=config.augment, learning_rate=config.learning_rate, epochs=config.epochs,
        patience=config.patience, monitor=config.monitor, seed=job.seed,
        resume=config.resume, augment_on=config.augment_on, optimizer=optimizer,
        tensorboard_dir=_board(job, runtime), cached=cached,
        label_smoothing=heads.label_smoothing)
    # The whole stage, view extraction included, so both ways compare honestly.
    ft["fit_seconds"] = ft.pop("seconds")
    ft["seconds"] = round(time.perf_counter() - started, 2)
    ft["views"] = cached.views if cached else 0
    history = ft.pop("history")
    job.run.write_csv(history, "history_finetune.csv")
    job.run.note("fine-tuning plot", plots.history(
        history, job.run.file("finetune_history.png"),
        title=f"Fine-tuning scenario {scenario} (epoch 0 = the starting head)",
        kept_epoch=ft["best_epoch"],
        metrics=tuple(dict.fromkeys(("accuracy", "loss", job.task.headline)))))
    return ft


def _final_report(job: Job, probs):
    """The final model on the validation images: interpretation plots and, for several
    classes or labels, the per-class report (``classification_report.csv``). Returns the
    per-label thresholds of a multi-label task (chosen here), else None."""
    task = job.task
    thresholds = (task_lib.choose_thresholds(job.y_val, probs) if task.kind == "multilabel"
                  else None)
    _interpret(job, job.run.path, probs, "final model")
    if task.kind != "binary":
        report = task_lib.per_class_report(task, job.y_val, probs, thresholds)
        job.run.note("per-class report", job.run.write_csv(report, "classification_report.csv"))
        confused = interpret.most_confused(task, job.y_val, probs)
        if confused:
            print("most confused (true -> predicted, validation images): " + "; ".join(
                f"{t} -> {p} ({n})" for t, p, n in confused))
    return thresholds


def _model_info(job: Job, scenario: str, blocks, scores: dict, thresholds=None) -> dict:
    """``model_info.json``: what predict.py needs to preprocess as in training, and the
    order and meaning of the model's outputs."""
    task = job.task
    return {"image_size": job.model.image_size, "task": task.kind,
            "class_names": list(task.class_names), "positive_class": task.positive_class,
            "scenario": scenario, "trainable_blocks": blocks,
            "include_top": job.model.include_top,
            "weights": weights_identity(job.model.weights, job.seed),
            "preprocessing": cache_lib.PREPROCESSING,
            "output": "P(positive class)" if task.kind == "binary" else
            "P(class) per class, in class_names order",
            "val_auc": scores.get("auc"), "val_accuracy": scores.get("accuracy"),
            "layout": job.dataset.layout, "trained_precision": job.precision.policy,
            **({"thresholds": [float(t) for t in thresholds]} if thresholds is not None else {})}


def _remove_stale_bag(job: Job) -> None:
    stale = job.run.file(inference.BAG_FILE)
    if os.path.exists(stale):
        os.remove(stale)  # never leave a bag from another run beside this model


def _export_bag(job: Job, heads: HeadsConfig, runtime: RuntimeConfig, scenario: str, blocks,
                single: dict) -> Optional[dict]:
    """bag.keras = the fold heads kept by the heads stage + the final model, when valid."""
    members = bag_lib.load_members(job.run.file("heads", "bag"), scenario)
    start = scenarios.get_scenario(scenario).start_layer(job.classifier.include_top)
    # Fold heads sit on the frozen layers below `start`; --trainable_blocks reaching
    # deeper changes those layers under them, so such a run gets no bag.
    if not members or scenarios.start_layer(blocks, job.classifier.include_top) != start:
        _remove_stale_bag(job)
        return None
    model = bag_lib.build_bag(job.classifier, scenarios.get_scenario(scenario).blocks, members)
    scores, _ = _validate(job, model, runtime.batch_size)
    job.run.note("bag", bag_lib.export(model, job.run.file(inference.BAG_FILE)))
    name = job.task.headline
    logging.info("Bag of %d fold heads + the final model: val %s %.4f (single model %.4f).",
                 len(members), name, scores[name], single[name])
    result = {"members": len(members) + 1, **{f"val_{k}": v for k, v in scores.items()},
              f"single_model_val_{name}": single[name], "file": inference.BAG_FILE}
    job.run.update_metrics("bag", result)
    return result


def predict_test(job: Job, config: PredictConfig, runtime: RuntimeConfig,
                 demo: bool = False) -> None:
    """Predicts the Kaggle test/ folder into submission.csv (with the bag when there is one):
    exactly the rows and columns of sample_submission.csv when it exists."""
    test = discovery.discover_unlabelled(job.dataset.data_dir)
    test = scan.filter_bad_images(test, job.model.image_size, "skip",
                                  job.run.file("bad_test_images.csv"), keep_rows=True)
    model = job.classifier.model
    if "bag" in job.run.outputs:
        model, _ = inference.load_exported(job.run.path, bag=True, policy=job.precision.policy)
    outputs = inference.predict_frame(model, test, job.model.image_size, runtime.batch_size,
                                      config.tta)
    probs = job.task.probabilities(outputs)
    job.run.note("submission", write_predictions(
        test.name, probs, job.run.file("submission.csv"), job.task.class_names,
        binary_column=submission_column(job.dataset.sample_submission)))
    hidden = os.path.join(job.dataset.data_dir, "test_labels.csv")
    if demo and os.path.isfile(hidden):
        truth = labels.read_labels(hidden, class_order=job.task.class_names,
                                   task=job.task.kind).frame
        y = np.asarray(truth.set_index("name").label.reindex(test.name).tolist())
        print(f"demo test set (synthetic): "
              f"{summary.scores_line(job.task, job.task.scores(y, probs))}")


def _run_stages(cfg: TrainConfig, engine=None):
    """The stages, in the order they run."""
    started = time.perf_counter()
    runtime = cfg.runtime
    job = prepare(cfg.data, cfg.model, cfg.heads, cfg.cache, runtime, cfg.flag_values)
    view_preset = cfg.finetune.view_preset
    views = max(cfg.cache.augmented_views,
                max(cfg.sweep.views) if cfg.runtime.stage == "sweep" or cfg.sweep.use else 0,
                cfg.finetune.views if runtime.finetunes and cfg.finetune.augment != "none" else 0)
    check_disk(job, cfg.cache, runtime, views, view_preset,
               exports=(2 if cfg.heads.bag else 1) if runtime.finetunes else 0)
    if engine is not None:
        engine.precision = job.precision.policy
        job.engine = engine.start()
    chosen = None
    sweep_file = job.run.file("sweep.csv")
    if runtime.stage == "sweep" or (cfg.sweep.use and runtime.stage == "all"
                                    and not os.path.isfile(sweep_file)):
        chosen = sweep_stage(job, cfg.sweep, cfg.heads, cfg.cache, runtime, view_preset)
    elif cfg.sweep.use:
        chosen = sweep.best_config(sweep.read_table(sweep_file))
    if chosen is not None and cfg.sweep.use:
        logging.info("Using the sweep's best configuration: %s.", chosen.describe())
        job.classifier.set_dropout(chosen.dropout)
        chosen = dataclasses.replace(chosen, dropout=None)
    scenario = None
    if runtime.heads:
        scenario = heads_stage(job, cfg.heads, cfg.cache, runtime, view_preset,
                               chosen if cfg.sweep.use else None)
    if runtime.finetunes:
        scenario = (cfg.finetune.scenario or
                    (chosen.scenario if cfg.sweep.use and chosen else None) or
                    scenario or chosen_scenario(job))
        finetune_stage(job, cfg.finetune, cfg.heads, cfg.cache, runtime, scenario,
                       optimizer=chosen.optimizer if cfg.sweep.use and chosen else "adam")
        if runtime.stage == "all" and job.dataset.test_dir:
            predict_test(job, cfg.predict, runtime, demo=cfg.data.demo)
    _print_outputs(job, started)
    return job


def chosen_scenario(job: Job) -> str:
    """The scenario the heads stage chose (recorded in ``metrics.json``)."""
    from pipeline.errors import ConfigError
    data = job.run.metrics()
    if "heads_choice" in data:
        logging.info("Scenario chosen by the heads stage (by %s): %s.",
                     data["heads_choice"]["by"], data["heads_choice"]["scenario"])
        return data["heads_choice"]["scenario"]
    raise ConfigError(f"No heads-stage results in {job.run.metrics_path}: run --stage=heads "
                      "first or pass --scenario.")


def _print_outputs(job: Job, started: float) -> None:
    job.run.note("metrics", job.run.metrics_path)
    job.run.note("log", job.run.file("train.log"))
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs in {job.run.path}:")
    for what, path in job.run.outputs.items():
        print(f"  {what:18s} {path}")
    if "model" in job.run.outputs:
        print(f"Next: python predict.py --workdir={job.run.path} --data_dir=FOLDER "
              f"--output=submission.csv")


def run(cfg: TrainConfig):
    """The whole training job, under the chosen tf.distribute strategy."""
    from features import distribute
    engine = None
    if cfg.runtime.ray_address:
        from features import ray_engine
        engine = ray_engine.RayEngine(cfg.runtime.ray_address, cfg.runtime.ray_workers, build={
            "weights": cfg.model.weights, "include_top": cfg.model.include_top,
            "image_size": cfg.model.image_size, "seed": cfg.seed})
    try:
        with distribute.scope(distribute.make_strategy(cfg.runtime.strategy,
                                                       cfg.runtime.cpu_replicas)):
            return _run_stages(cfg, engine)
    finally:
        if engine is not None:
            engine.stop()
