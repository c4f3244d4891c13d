"""Playing inside a world model: a pygame window driven by the keyboard, or a scripted headless rollout.

Keys map to actions through the game's action names (ALE's ``UP``, ``RIGHTFIRE``, ...): the arrow
keys (or WASD) give the direction and space gives ``FIRE``; the pressed combination picks the action
whose name spells it, dropping ``FIRE`` and then a direction when the game has no such combination.
Without names (any other env), number keys 0-9 choose the action id. A multi-key model receives
every mapped key held as one set. Esc or closing the window ends the game; R restarts from the real
frames. The window shows the imagined frame and the frame rate it is imagined at.

:func:`play_window` takes an ``events`` source, so a test drives it with SDL's dummy video driver and
injected key events; :func:`play_headless` runs a list of actions and writes the rollout as a GIF.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from quintet.core.validation import check_int, check_number
from quintet.genie.world import World

DIRECTIONS = ("UP", "DOWN", "LEFT", "RIGHT")


def key_names() -> dict[int, str]:
    """pygame key code -> the action-name part it presses."""
    import pygame

    return {
        pygame.K_UP: "UP",
        pygame.K_w: "UP",
        pygame.K_DOWN: "DOWN",
        pygame.K_s: "DOWN",
        pygame.K_LEFT: "LEFT",
        pygame.K_a: "LEFT",
        pygame.K_RIGHT: "RIGHT",
        pygame.K_d: "RIGHT",
        pygame.K_SPACE: "FIRE",
    }


def action_for(pressed: Iterable[str], meanings: Sequence[str]) -> int:
    """The action id whose name spells the pressed parts (``{"UP", "FIRE"}`` -> ``UPFIRE``), else the closest
    one the game has (fire dropped, then one direction), else ``NOOP`` (id 0)."""
    pressed = set(pressed)
    if pressed >= {"UP", "DOWN"}:
        pressed -= {"UP", "DOWN"}  # opposite directions cancel, as on a joystick
    if pressed >= {"LEFT", "RIGHT"}:
        pressed -= {"LEFT", "RIGHT"}
    vertical = [d for d in ("UP", "DOWN") if d in pressed]
    horizontal = [d for d in ("LEFT", "RIGHT") if d in pressed]
    fire = ["FIRE"] if "FIRE" in pressed else []
    index = {name: i for i, name in enumerate(meanings)}
    for parts in (
        vertical + horizontal + fire,
        vertical + horizontal,
        vertical + fire,
        horizontal + fire,
        vertical,
        horizontal,
        fire,
    ):
        name = "".join(parts)
        if name and name in index:
            return index[name]
    return index.get("NOOP", 0)


def play_headless(
    world: World,
    actions: Sequence[object],
    out: str | os.PathLike,
    *,
    fps: float = 10.0,
    scale: int = 4,
    start: tuple[np.ndarray, Sequence | None],
) -> dict[str, object]:
    """Reset ``world`` to ``start = (frames, actions)``, take ``actions``, write the frames (the last real
    one, then one per action) to the GIF ``out``; returns what was written and how fast it imagined."""
    from quintet.data.images import save_gif

    check_number(fps, "fps", low=0.0, low_open=True)
    if not len(actions):
        raise ValueError("actions: a headless rollout needs at least one action")
    for index, action in enumerate(actions):  # every action is checked before anything is imagined
        world.action_tensor(action, f"actions[{index}]")
    out = Path(out)
    if out.suffix.lower() != ".gif":
        raise ValueError(f"out: a headless rollout is written as an animated GIF (*.gif), got {out}")
    frames = [world.reset(*start)]
    began = time.perf_counter()
    frames.extend(world.step(action) for action in actions)
    seconds = time.perf_counter() - began
    save_gif(np.stack(frames), out, fps=fps, scale=scale)
    return {"gif": str(out), "frames": len(actions), "imagined_fps": round(len(actions) / seconds, 2)}


def play_window(
    world: World,
    *,
    start: tuple[np.ndarray, Sequence | None],
    meanings: Sequence[str] | None,
    fps: float = 15.0,
    steps: int = 0,
    scale: int = 8,
    events: Callable[[], list] | None = None,
) -> dict[str, object]:
    """Play ``world`` in a pygame window until Esc / close (or ``steps`` imagined frames, when > 0).

    ``events()`` returns the pygame events of one frame (default ``pygame.event.get``); the held keys
    are tracked from KEYDOWN / KEYUP events, so injected events drive it like a keyboard. Returns the
    frames imagined, the seconds played and the imagined frames per second.
    """
    import pygame

    check_number(fps, "fps", low=0.0, low_open=True)
    check_int(steps, "steps", minimum=0)
    check_int(scale, "scale")
    pygame.init()
    try:
        frame = world.reset(*start)
        c, h, w = frame.shape
        screen = pygame.display.set_mode((w * scale, h * scale + 24))
        pygame.display.set_caption("quintet genie: arrows / WASD move, space fires, R restarts, Esc quits")
        font = pygame.font.Font(None, 22)
        clock = pygame.time.Clock()
        names, held = key_names(), set()
        digits = {getattr(pygame, f"K_{d}"): d for d in range(10)}
        chosen_digit, imagined, began, message = 0, 0, time.perf_counter(), ""
        running = True
        while running:
            for event in (events or pygame.event.get)():
                if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE):
                    running = False
                elif event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                    frame = world.reset(*start)
                elif event.type == pygame.KEYDOWN and event.key in names:
                    held.add(names[event.key])
                elif event.type == pygame.KEYUP and event.key in names:
                    held.discard(names[event.key])
                elif event.type == pygame.KEYDOWN and event.key in digits and meanings is None:
                    chosen_digit, message = _digit_action(world, digits[event.key], chosen_digit)
                elif event.type == pygame.KEYDOWN:
                    message = f"key {pygame.key.name(event.key)!r} does nothing"
            if not running:
                break
            frame = world.step(_current_action(world, held, meanings, chosen_digit))
            imagined += 1
            rate = imagined / max(time.perf_counter() - began, 1e-9)
            image = pygame.surfarray.make_surface(np.ascontiguousarray(frame.transpose(2, 1, 0)))
            screen.fill((0, 0, 0))
            screen.blit(pygame.transform.scale(image, (w * scale, h * scale)), (0, 24))
            status = f"{rate:5.1f} imagined frames/s   {_describe(held, meanings, chosen_digit)}   {message}"
            screen.blit(font.render(status, True, (255, 255, 255)), (4, 4))
            pygame.display.flip()
            clock.tick(fps)
            if steps and imagined >= steps:
                break
        seconds = time.perf_counter() - began
        return {
            "frames": imagined,
            "seconds": round(seconds, 2),
            "imagined_fps": round(imagined / max(seconds, 1e-9), 2),
        }
    finally:
        pygame.quit()


def _digit_action(world: World, digit: int, current: int) -> tuple[int, str]:
    if world.num_actions is None or digit >= world.num_actions:
        return current, f"action {digit} does not exist (0..{(world.num_actions or 1) - 1})"
    return digit, ""


def _current_action(world: World, held: set[str], meanings: Sequence[str] | None, digit: int) -> object:
    config = world.dynamics.config
    if not config.has_actions:
        return None
    if meanings is None:
        return digit if config.max_keys == 1 else [digit]
    if config.max_keys == 1:
        return action_for(held, meanings)
    index = {name: i for i, name in enumerate(meanings)}
    return [index[name] for name in sorted(held) if name in index][: config.max_keys]


def _describe(held: set[str], meanings: Sequence[str] | None, digit: int) -> str:
    if meanings is None:
        return f"action {digit}"
    return "+".join(part for part in (*DIRECTIONS, "FIRE") if part in held) or "NOOP"
