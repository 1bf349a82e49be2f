"""The command-line programs (llama-chat, llama-convert, llama-reshard, llama-perplexity, the demo) and how
they report errors."""
