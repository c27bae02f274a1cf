"""The commands: ``tl-dist train | predict | evaluate | export | lr-find | runs | doctor``.

Each module has ``main(argv, prog) -> exit code``: arguments in, one line on stderr for a user's
mistake (exit 2), the work done by the packages beside this one.
"""
