"""Reports for the data-protection officer: `waconsent report html`.

`model` holds the plain data and the pure trend arithmetic, `page` renders one self-contained
HTML file from it, `gather` reads the store and the CRM to fill it. Data flows one way.
"""
