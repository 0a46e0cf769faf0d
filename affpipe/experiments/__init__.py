"""The research questions' run grid (``grid``, recipes in ``recipes/``) and the run report."""
