"""The lab: what launches runs of the VMM and its vCPUs, measures them and reports.

``launcher`` starts one host and its vCPU processes and collects their results;
``campaign`` runs every path of ``vtick run``; ``run`` is that subcommand's logic;
``metrics`` turns results into figures; ``report`` prints the tables; ``compare`` diffs
two results files; ``plots`` and ``trace`` write PNG plots and Perfetto traces.
"""
