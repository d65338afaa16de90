"""The training runtime an agent starts for one project: aggregator and learner processes.

These modules run inside the learner / aggregator environments (which have Flower installed);
the manager never imports them. They speak to their agent through JSON report lines
(``flops.runtime.reports``).
"""
