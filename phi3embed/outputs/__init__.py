"""Where results go: the manifest, atomic publishing, resume, per-image and packed writers, the reader."""
