def sparse_query_attention(*a, **k):
    raise NotImplementedError
