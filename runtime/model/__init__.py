"""Model math and loading: config, transformer, FFN shards and their kernel, weights, tokenizer, registry."""
