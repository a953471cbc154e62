"""Class-quota pruning (DRoP: Vysogorets, Ahuja, Kempe, ICLR 2025).

Each class k keeps a quota proportional to N_k (1 - r_k), r_k its recall on a held-out
validation split. The split is drawn from the TRAINING set (stratified by class, seeded)
and a model trained on the rest measures the recalls, so the test set never decides what
is pruned. Within a class the kept images are random (the scores' seeded `random`
column). A quota larger than its class is capped at the class size and the excess goes
to the other classes in proportion to their weights, until every quota fits. A class
with no error on the split (r_k = 1) weighs 0: it keeps images only once the classes with
errors are full, so a small split can prune a class away entirely (the keep ratio shows
it; a larger --quota-val-fraction measures r_k more finely). The `class-quota-laplace`
policy guards against that: it estimates each error rate by Laplace's rule of succession,
(errors + 1) / (n_k + 2), so 0 errors in 20 weighs 1/22 instead of 0.
"""
import numpy as np

from ffcv_bias.studies.diet.common import DietError

POLICY = "class-quota"
HOLDOUT_SCORE = "quota-holdout"   # data.score of the run that measures the recalls
VAL_INDICES_FILE = "quota_val_indices.npy"
TRAIN_INDICES_FILE = "quota_train_indices.npy"
RECALL_FILE = "class_recall.csv"


def holdout_split(labels, fraction, seed):
    """(train indices, val indices), ascending: round(fraction N_k) images of each class
    (at least one, never the whole class) go to the validation split."""
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 < fraction < 1:
        raise DietError(f"--quota-val-fraction must be in (0, 1), not {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        if len(members) < 2:
            raise DietError(f"class {class_id} has {len(members)} training image(s): a "
                            f"held-out split needs at least 2 per class")
        count = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        val.append(rng.permutation(members)[:count])
    val = np.sort(np.concatenate(val)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val).astype(np.int64)
    return train, val


def class_recall(predictions, labels, val_indices, num_classes):
    """(recall [C], n_val [C]) of each class on the validation split."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    val_labels, val_predictions = labels[val_indices], predictions[val_indices]
    n_val = np.bincount(val_labels, minlength=num_classes)
    correct = np.bincount(val_labels[val_predictions == val_labels], minlength=num_classes)
    if np.any(n_val == 0):
        missing = int(np.flatnonzero(n_val == 0)[0])
        raise DietError(f"class {missing} has no image in the validation split")
    return correct / n_val, n_val


def laplace_recall(recall, n_val):
    """Recall after Laplace's rule on the error count: 1 - (errors + 1) / (n + 2)."""
    recall, n_val = np.asarray(recall, dtype=np.float64), np.asarray(n_val, dtype=np.float64)
    errors = np.rint((1.0 - recall) * n_val)
    return 1.0 - (errors + 1.0) / (n_val + 2.0)


def _water_fill(capacity, weights, total):
    """Real-valued quotas: total split in proportion to weights, none above its capacity
    (the excess of a capped class goes to the uncapped ones, repeatedly)."""
    quotas = np.zeros(len(capacity))
    capped = np.zeros(len(capacity), dtype=bool)
    while True:
        open_classes = ~capped & (weights > 0)
        left = total - capacity[capped].sum()
        if not open_classes.any() or left <= 0:
            return np.where(capped, capacity, 0.0), max(left, 0.0)
        quotas = np.where(open_classes, left * weights / weights[open_classes].sum(), 0.0)
        over = open_classes & (quotas > capacity)
        if not over.any():
            return np.where(capped, capacity, quotas), 0.0
        capped |= over


def class_quotas(class_sizes, recall, keep_total):
    """Integer quotas [C] summing to keep_total, each <= its class size, proportional to
    N_k (1 - r_k) after redistribution. If the classes with errors cannot hold
    keep_total, the rest is spread over the error-free classes by size. Rounding: the
    floors, then one more for the largest remainders (ties: lower class id)."""
    sizes = np.asarray(class_sizes, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    if keep_total > sizes.sum() or keep_total < 0:
        raise DietError(f"cannot keep {keep_total} of {int(sizes.sum())} images")
    weights = sizes * (1.0 - recall)
    real, left = _water_fill(sizes, weights, float(keep_total))
    if left > 0:  # every class with errors is full: the error-free ones share the rest
        extra, _ = _water_fill(sizes - real, np.where(weights > 0, 0.0, sizes), left)
        real = real + extra
    quotas = np.minimum(np.floor(real), sizes).astype(np.int64)
    remainders = real - quotas
    shortfall = int(keep_total - quotas.sum())
    room = quotas < sizes
    order = np.lexsort((np.arange(len(sizes)), -remainders))
    for class_id in [c for c in order if room[c]][:shortfall]:
        quotas[class_id] += 1
    if quotas.sum() != keep_total:  # cannot happen: a remainder > 0 means room for one more
        raise AssertionError(f"class quotas sum to {quotas.sum()}, not {keep_total}")
    return quotas


def quota_keep_indices(labels, recall, random_scores, keep_total):
    """(kept indices ascending, quotas): each class's quota of its highest random scores
    (ties: lower index), i.e. a seeded random sample within each class."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(recall)
    quotas = class_quotas(np.bincount(labels, minlength=num_classes), recall, keep_total)
    kept = []
    for class_id, quota in enumerate(quotas):
        members = np.flatnonzero(labels == class_id)
        ranking = np.lexsort((members, -np.asarray(random_scores)[members]))
        kept.append(members[ranking[:quota]])
    return np.sort(np.concatenate(kept)).astype(np.int64), quotas
