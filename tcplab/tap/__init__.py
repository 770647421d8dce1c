"""twistd glue: each module holds the ``Options`` and ``makeService`` for one server."""
