"""A run as a unit: its record (what it is and wrote), its folder (one writer: lock, staging, swap), loading a
finished one, and the stage driver that runs the commands."""
