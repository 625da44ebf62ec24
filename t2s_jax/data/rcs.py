"""Rare class sampling (DAFormer; method.md section 2) from the statistics stored at preparation."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RareClassSampler:
    classes: np.ndarray  # (C,) classes that can be drawn
    probabilities: np.ndarray  # (C,) P(c) = softmax((1 - f_c) / T) over `classes`
    candidates: tuple[np.ndarray, ...]  # per drawable class: example indices with > min_pixels of it

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(class, example index): a class by P(c), then a file holding it uniformly."""
        k = rng.choice(len(self.classes), p=self.probabilities)
        return int(self.classes[k]), int(rng.choice(self.candidates[k]))


def make_rare_class_sampler(
    class_pixels: np.ndarray,
    class_examples: tuple[np.ndarray, ...],
    temperature: float,
    min_pixels: int,
) -> RareClassSampler:
    """`class_pixels`: (K,) pixels per class over the set; `class_examples[c]`: (n, 2) rows
    [example index, pixels of c]. Classes without any file above `min_pixels` cannot be
    drawn; the softmax is renormalised over the others."""
    frequency = class_pixels / max(class_pixels.sum(), 1)
    classes, candidates = [], []
    for c, rows in enumerate(class_examples):
        files = rows[rows[:, 1] > min_pixels, 0]
        if class_pixels[c] > 0 and len(files):
            classes.append(c)
            candidates.append(files)
    if not classes:
        raise ValueError(f"rare class sampling: no example holds more than {min_pixels} pixels of any class")
    classes = np.asarray(classes)
    logits = (1.0 - frequency[classes]) / temperature
    probabilities = np.exp(logits - logits.max())
    return RareClassSampler(classes, probabilities / probabilities.sum(), tuple(candidates))
