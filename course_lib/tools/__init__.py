"""Tools around the course: where files are (paths), the machine (device), figures (viz)."""
