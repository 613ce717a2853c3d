"""``nnunet-tpp evidence``: does TPP make PEFT better? A fixed, seeded protocol on real data.

:mod:`.split` divides a folder once into test subjects and a training pool and draws each seed's labelled cases,
:mod:`.stats` summarises arms over seeds and bootstraps paired differences, :mod:`.plan3d` chooses a CPU-sized
nnU-Net plan, :mod:`.protocol3d` runs the 3-D arms through the package's nnU-Net trainers and :mod:`.report`
writes ``evidence.json``, the Markdown table and the plot.
"""
