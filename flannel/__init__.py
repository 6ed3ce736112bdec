"""Flannel: the edge cache between clients and the chat tier, answering from memory (issue 8)."""
