"""Files: atomic writes (``atomic``), the checkpoint format and its checks (``checkpoint``), the
resume state (``resume_file``), the run directory and its lock (``run_dir``), writing while the next
epoch trains (``background_writer``), exported models (``exported``), and the rules for writing a
command's outputs beside a user's files (``outputs``).
"""
