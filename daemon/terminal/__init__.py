"""The terminal side of the CLI: the chat REPL, where answers come from (a loaded model or a running daemon),
how they and the model library are printed."""
