"""The `vita-audio` command: parse arguments, call a library function, print."""
