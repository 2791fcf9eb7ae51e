"""PLACEHOLDER: being written."""


def linear_token_logprobs(
    hidden, weight, ids, *, bias=None, temperature=1.0, return_entropy=False, chunk_size=None
):
    raise NotImplementedError
