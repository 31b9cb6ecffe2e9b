"""Where the tokens come from: the corpora registry (`corpora/`), the embedded assets, noise injection
with every token's kind, and chat rendering. `slm prepare` packs them into token stores."""
