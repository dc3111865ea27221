"""The prefix cache: KV cells of prompts already prefilled, found by the prefix they continue
(``prefix``), kept in bounded RAM and disk tiers shared by processes (``store``)."""
