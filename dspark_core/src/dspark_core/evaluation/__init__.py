"""``dspark eval``'s library: the paper's evaluation protocol on prompt files, batched.

| module | job |
|---|---|
| ``datasets`` | DeepSpec benchmark files, chat JSONL and pre-tokenised rows as conversations |
| ``runner`` | ``evaluate``: every dataset at every temperature, in batches, plain decoding interleaved |
| ``report`` | ``EvalReport``: figures per dataset and overall, the Table-1-style table, JSON, plot |

The figures' names and definitions are :mod:`dspark_core.decoding.figures`'.
"""
