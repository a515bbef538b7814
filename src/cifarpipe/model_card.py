"""The model card: markdown about one trained model, written from its run's record (a pure function).

tracking/card.py gathers the facts from the MLflow run (params, tags, dataset inputs, metrics) and
evaluate's per-class table, and publishes the text: artifact `model_card.md` of the run and of its
MLflow model, and the registered version's description.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Param sections shown in the card's table of the values in force (the run holds all of them).
_PARAM_SECTIONS = ("model.", "train.", "split.", "evaluate.")


@dataclass(frozen=True)
class CardFacts:
    """What the card says, all from the run's record."""
    run_id: str
    run_name: str
    params: dict[str, str]  # every param in force, flattened (`train.optimizer.lr`), as the run logged them
    tags: dict[str, str]  # the run's tags: data_md5, split_hash, git commit, device, versions
    classes: list[str]
    sizes: dict[str, int]  # images per part: training, validation, test (as far as known)
    digests: dict[str, str]  # the MLflow dataset digest of each part
    validation: list[tuple[int, float, float]]  # (epoch, val_accuracy, val_loss) of every epoch
    test: dict[str, float] | None = None  # test_accuracy, test_loss; None: not evaluated yet
    per_class: list[dict] | None = None  # rows: class, support, correct, accuracy, precision
    registered: str | None = None  # "cifar10-classifier version 3"
    notes: list[str] = field(default_factory=list)


def render(f: CardFacts) -> str:
    """The card as markdown (a heading per section; tables as GitHub markdown, which MLflow renders)."""
    p = f.params
    title = f"# Model card: {f.registered}" if f.registered else f"# Model card: run {f.run_name}"
    lines = [title, "", f"Trained in MLflow run `{f.run_id}` ({f.run_name}); "
             f"model `{p.get('model.name', '?')}`" + (f", width {p['model.width']}" if "model.width" in p else "")
             + (f", test-time views `{p['model.tta']}`" if p.get("model.tta", "none") != "none" else "") + "."]
    lines += ["", "## Intended use and limits", "", *_scope(f.classes)]
    lines += ["", "## Input and output", "", *_interface(f.registered)]
    lines += ["", "## Data", "", *_data(f)]
    lines += ["", "## Validation", "", *_validation(f.validation, f.tags)]
    lines += ["", "## Test", "", *_test(f)]
    lines += ["", "## Parameters in force", "", "| param | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(p.items()) if k == "recipe" or k.startswith(_PARAM_SECTIONS)]
    lines += ["", "## Provenance", "", *_provenance(f.tags)]
    if f.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in f.notes]]
    return "\n".join(lines) + "\n"


def _scope(classes: list[str]) -> list[str]:
    named = (f"the {len(classes)} CIFAR-10 classes: " + ", ".join(f"`{c}`" for c in classes)) if classes \
        else "the 10 CIFAR-10 classes"
    return [
        f"- Classifies 32x32 RGB images into {named}.",
        "- Every input gets one of these classes: there is no \"none of these\" answer, so an image of anything "
        "else is still put into one of them, with a probability that means nothing.",
        "- Images of any other size are made 32x32 first (the largest centred square, bilinear): detail "
        "finer than one pixel of that 32x32 image is lost.",
        "- Trained and tested only on CIFAR-10 (small photographs collected in 2009); accuracy on other "
        "photographs, drawings, medical or satellite images is unknown.",
        "- The probabilities are the network's softmax, not calibrated; the validation and test figures below "
        "are the only measured quality.",
    ]


def _interface(registered: str | None) -> list[str]:
    uri = f"models:/{registered.split(' version ')[0]}@champion" if registered else "runs:/<run id>/model"
    return ["- In: uint8 images, N x 32 x 32 x 3 (height, width, RGB), as CIFAR-10 stores them; the model "
            "normalises them with its training data's mean and std.",
            "- Out: one row per image: `class`, `class_index`, `probability`, and `prob_<class>` for every class.",
            f"- `mlflow.pyfunc.load_model(\"{uri}\")` (the registry's best version; `/latest` the newest), or "
            "`cifarpipe-predict --model <URI> FILES`."]


def _data(f: CardFacts) -> list[str]:
    p, t = f.params, f.tags
    out = [f"- Archive: `{p.get('data.url', '?')}`, MD5 `{t.get('data_md5', p.get('data.md5', '?'))}`."]
    out.append(f"- Split: method `{p.get('split.method', '?')}`, seed {p.get('split.seed', '?')}, validation "
               f"fraction {p.get('split.val_fraction', '?')}; split hash `{t.get('split_hash', '?')}`.")
    out += ["", "| part | images | MLflow dataset digest |", "|---|---|---|"]
    out += [f"| {part} | {f.sizes[part]:,} | `{f.digests.get(part, '')}` |"
            for part in ("training", "validation", "test") if part in f.sizes]
    return out


def _validation(rows: list[tuple[int, float, float]], tags: dict[str, str]) -> list[str]:
    if not rows:
        return ["No epoch was logged."]
    best = max(rows, key=lambda r: r[1])
    # the run's tags say which weights the model holds (evaluate.weights); without them, the last epoch's
    epoch = int(tags.get("weights_epoch", rows[-1][0]))
    held = next((r for r in rows if r[0] == epoch), rows[-1])
    which = f" (evaluate.weights `{tags['weights']}`)" if "weights" in tags else ""
    stopped = f", stopped early at epoch {tags['stopped_early_at']}" if "stopped_early_at" in tags else ""
    return [f"- {len(rows)} epochs trained{stopped}. This model holds the weights of epoch {held[0]}{which}: "
            f"validation accuracy {held[1]:.4f}, loss {held[2]:.4f}.",
            f"- Best validation accuracy {best[1]:.4f}, at epoch {best[0]} (the run's checkpoint models hold "
            "that epoch's file)."]


def _test(f: CardFacts) -> list[str]:
    if f.test is None:
        return ["Not evaluated yet: the evaluate stage adds the test results to this card."]
    n = f.sizes.get("test")
    out = [f"- Test accuracy **{f.test['test_accuracy']:.4f}**, loss {f.test['test_loss']:.4f}"
           + (f", on {n:,} images." if n else ".")]
    if f.per_class:
        out += ["", "| class | images | correct | accuracy | precision |", "|---|---|---|---|---|"]
        out += [f"| {r['class']} | {int(r['support'])} | {int(r['correct'])} | {float(r['accuracy']):.3f} | "
                f"{float(r['precision']):.3f} |" for r in f.per_class]
        worst = min(f.per_class, key=lambda r: float(r["accuracy"]))
        out += ["", f"Weakest class: `{worst['class']}` ({float(worst['accuracy']):.3f})."]
    return out


def _provenance(tags: dict[str, str]) -> list[str]:
    commit = tags.get("mlflow.source.git.commit", "unknown")
    return [f"- Code: commit `{commit}`" + (" with uncommitted code changes (tag git_dirty_code_files)"
                                             if tags.get("git_dirty_code") == "true" else "") + ".",
            f"- Trained on `{tags.get('device', '?')}`, torch {tags.get('torch', '?')}.",
            "- How to reproduce: the run's Description."]
