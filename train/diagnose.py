"""Verdicts on a run for its user: predictions collapsed onto one token, and whether --overfit-batch reached ~0."""

from __future__ import annotations

OVERFIT_LOSS = 0.05  # --overfit-batch succeeds when the loss of the batch falls below this
COLLAPSE_TOP_SHARE = 0.5  # "collapsed": one token predicted at more than half of the masks ...
COLLAPSE_LOSS_SHARE = 0.99  # ... while the loss is that of a unigram model (or, at the [MASK] slots, ...
COLLAPSE_ACC_SHARE = 1.1  # ... the accuracy at most this share of always guessing the most frequent token) ...
COLLAPSE_EVALS = 2  # ... at this many evaluations in a row (every healthy run passes through it once)


def collapsed(result: dict) -> bool:
    """True when predictions sit on one token and beat no frequency baseline: judged at the [MASK] slots when
    `evaluate` counted them (copying the unchanged slots lowers the loss of a model that ignores the context),
    else by the loss over every masked slot."""
    if "mask_acc" in result:
        return (result["mask_top_prediction_share"] > COLLAPSE_TOP_SHARE
                and result["mask_acc"] <= COLLAPSE_ACC_SHARE * result["mask_baseline_acc"])
    return (result["top_prediction_share"] > COLLAPSE_TOP_SHARE
            and result["mlm_loss"] > COLLAPSE_LOSS_SHARE * result["unigram_loss"])


def collapse_warning(result: dict, tokens: list[str], peak_lr: float) -> str:
    """The warning for a run whose evaluations keep finding `collapsed` predictions."""
    if "mask_acc" in result:
        return (f"warning: at the [MASK] slots the model predicts {tokens[result['mask_top_prediction']]!r} "
                f"{result['mask_top_prediction_share']:.0%} of the time and is right no more often than always "
                f"guessing the most frequent token ({result['mask_acc']:.1%} against "
                f"{result['mask_baseline_acc']:.1%}): it does not use the context yet. Every run starts so, and "
                f"the longer its rows the longer it takes (shards of --max-len 16 show within minutes on a CPU "
                f"whether a small model learns); if it persists, train on more text or for longer, or lower --lr "
                f"(now {peak_lr:g}).")
    return (f"warning: the model predicts the same token ({tokens[result['top_prediction']]!r}) at "
            f"{result['top_prediction_share']:.0%} of the masks and its loss {result['mlm_loss']:.3f} is that of "
            f"token frequencies alone ({result['unigram_loss']:.3f}): it has collapsed to predicting frequent "
            f"tokens. If this persists, lower --lr (now {peak_lr:g}).")


def overfit_verdict(first_loss: float, final_loss: float, steps: int) -> str:
    """The line that says whether --overfit-batch drove the loss of its batch to ~0."""
    verdict = ("reached ~0: model, loss and optimizer can learn" if final_loss < OVERFIT_LOSS else
               f"did NOT reach ~0 (below {OVERFIT_LOSS}): something keeps the model from learning; "
               f"try more --steps or another --lr")
    return f"overfit-batch: loss {first_loss:.4f} -> {final_loss:.4f} after {steps} steps: {verdict}"
