"""Training data: conversation sources and adapters (`conversations`), chat-template tokenisation (`chat`)."""
