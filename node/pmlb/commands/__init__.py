"""The ``pmlb`` command and its subcommands, one module each.

``cli`` builds the parser and dispatches; a subcommand's work lives in its
own module here (``admin``: ``upstream`` and ``status``; ``dashboard``;
``connect``; ``demo``). A new subcommand is a module here plus its parser in
``cli``. Commands are the top floor: they may import anything below, and
nothing imports them.
"""
