"""Calibration of the draft's confidence head (sequential temperature scaling, STS) for serving.

| module | job |
|---|---|
| ``records`` | per verify round: the raw confidence logits of the drafted slots and how many were accepted |
| ``metrics`` | ECE, Brier score and AUROC of the running product of calibrated confidences, per position |
| ``sts`` | the greedy sequential fit of one temperature per position |
| ``files`` | ``sts.json`` (SGLang's schema) and the richer ``dspark_calibration.json``; draft weight hashes |
| ``calibrate`` | the ``dspark calibrate`` job: decode held-out prompts, fit, write |
| ``plot`` | reliability diagrams (matplotlib) |
| ``serving`` | what ``check-draft`` prints about a draft folder's calibration (engine flags, staleness) |

``files`` and ``serving`` import no torch; the others do.
"""
