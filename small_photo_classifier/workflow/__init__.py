"""From the data to a run folder and back: the stages of train.py, predict.py, serve.py
and export.py, in four layers that import one way only (`tests/test_shape.py` walks
every import, function-local ones too):

* ``base``  — flags, the typed configuration, the console, the run folder's files and
  state, the stage clock: what every other layer uses, using none of them;
* ``views`` — what people read: report.html, plots, summaries;
* ``use``   — a trained run put to use: predict.py, the deployment formats, serve.py,
  the calibration and unfamiliar score applied;
* ``train`` — making a run: the job, the stages, backbones compared, the final model and
  its export, label audits, the calibration fitted.
"""
