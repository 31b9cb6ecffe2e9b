"""The method, as pure tensor functions: score kinds, selection strategies and objectives, each behind a
registry with a declared contract (what it needs), and the one next-token shift of the project.

No files, no config, no logging: tensors in, tensors out."""
