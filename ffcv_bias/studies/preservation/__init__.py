"""Label preservation (Balestriero, Bottou & LeCun 2022, Sec. 3.2, Figs. 5-6): at which
augmentation strength does each class lose its label? A trained model is evaluated on
test (and train) images under growing crop, CutOut and colour-jitter strengths.

    python -m ffcv_bias.studies.preservation --weights runs/<run_id> \
        --dataset data/imagenet_val.beton --out preservation/

- `transforms`  the strengths and the seeded transforms (torch)
- `evaluation`  the passes over a beton (one compiled crop pipeline) and their tally
- `tables`      per-class / mean accuracy, where each class loses its label
- `figures`     per-class and mean curves
- `cli`         the command: arguments, outputs, summary

Its flags, transforms and outputs: docs/DESIGN.md, "Label preservation".
"""
