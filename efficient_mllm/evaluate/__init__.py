"""efficient_mllm.evaluate: evaluators registered in ``registry.EVALUATORS`` (exact match by
generation, teacher-forced answer accuracy, perplexity) and a runner."""

from efficient_mllm.evaluate.evaluators import (  # noqa: F401
    ExactMatch,
    Evaluator,
    Perplexity,
    TeacherForced,
    build_evaluators,
    run_evaluators,
    summarize_correct,
)
