"""Knowledge: document extraction, chunking, embedding and retrieval for files and knowledge bases."""
