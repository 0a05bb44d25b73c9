"""The model contract export/ imports: manifest, preprocessing, refer decision, tissue check, sources."""
