"""The ``torchsgd`` command line: demo, explain, trajectories and bench.

It sits on top of the library and may use rich, matplotlib and scikit-learn (the ``cli`` extra);
nothing in the library imports it.
"""
