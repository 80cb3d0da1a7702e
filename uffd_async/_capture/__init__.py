"""Taking snapshots: write tracking, live snapshots, the layer file format and its writers."""
