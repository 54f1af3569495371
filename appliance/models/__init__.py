"""Model updates: signed manifests, resumable downloads, the store, going live."""
