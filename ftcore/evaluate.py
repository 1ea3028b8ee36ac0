"""The old import path of ftcore.evaluation (the evaluation driver, now a package with its
metrics, baselines, report and plots): `from ftcore.evaluate import run_eval` keeps working."""
from ftcore.evaluation import *  # noqa: F401,F403
from ftcore.evaluation import (LabelSet, _ShotBuilder, baseline_for_run, baseline_results, completion_loss,  # noqa: F401
                               continuation_logprobs, eval_dtype, eval_examples, evaluate_for_run, evaluate_model,
                               label_logprobs, label_sets, lead_source, rank_classify, read_generations, run_eval,
                               write_generations, write_report)
from ftcore.evaluation.metrics import (accuracy, bleu, classification_metrics, generation_metrics,  # noqa: F401
                                       natural_order, normalize_label, rouge)
